// Package fakeanthropic is a faithful stand-in for the Anthropic Messages API,
// for tests, for `sluice dev` and the demo, for the load tester, and for
// operators who rehearse failures. It honours the facts in
// shared/UPSTREAM.md: both auth header styles, the exact JSON and SSE wire
// format the Go SDK parses, per-group token buckets with the real
// anthropic-ratelimit-* headers and 429s, both OTPM accounting modes, paced
// output and injected faults.
//
// # API routes
//
//	POST /v1/messages               Messages, streaming or not
//	POST /v1/messages/count_tokens  {"input_tokens": N}; its own RPM bucket per group
//	anything else                   404 not_found_error
//
// Authentication is `x-api-key: K` or `Authorization: Bearer K`; missing or
// unknown keys get 401 authentication_error. An anthropic-version header is
// required, with any value. Bodies over 32 MB get the CDN's 413
// {"error":{"type":"request_too_large",...}}. Every response carries a
// request-id: req_… header; error bodies have the API's shape
// {"type":"error","error":{"type","message","details"?},"request_id"}.
//
// # Control routes
//
// These live on the same handler, without authentication, so that
// out-of-process tools can steer and watch a running fake:
//
//	GET  /_fake/stats    Stats as JSON (snake_case keys). ?log=N keeps only the
//	                     last N log records; ?log=0 leaves the log out.
//	POST /_fake/reset    ResetStats; answers 204. Buckets and queued faults stay.
//	POST /_fake/faults   QueueFaults, with the body
//	                     {"faults":[{"kind":"overloaded"},{"kind":"rate_limit","retry_after_seconds":2}]};
//	                     answers {"queued": N}, the queue length now, or 400
//	                     for an unknown kind.
//
// # Token counting and replies
//
// Input tokens follow CountTokens: 8 framing tokens, plus ceil(bytes/4) of
// every text of the system prompt and the messages (other blocks: of their
// compact JSON), plus 4 per message. A reply is made of deterministic words,
// one word and a space per output token, so that text deltas, words and
// usage.output_tokens agree. Its length is Config.ReplyTokens unless the
// last user message says otherwise with a directive; max_tokens always caps
// it (stop_reason "max_tokens"):
//
//	[[reply_tokens=N]]  reply with N output tokens
//	[[cache_write=N]]   report N cache_creation_input_tokens (they count toward ITPM)
//	[[cache_read=N]]    report N cache_read_input_tokens (they do not)
//
// The cache directives describe a cached prefix on top of the counted
// prompt: input_tokens stays CountTokens of the body.
//
// # Rate limits
//
// Each Group has three token buckets (requests, input tokens, output tokens)
// whose capacity is the per-minute limit and which refill continuously at
// limit/60 per second on Config.Clock. A request that does not fit gets 429
// rate_limit_error naming the limit, retry-after (whole seconds until it
// would fit, at least 1) and x-should-retry: true. In OTPMReserve mode
// max_tokens is reserved at admission and the unused part given back at the
// end; in OTPMRealtime mode each token is taken as it is produced. Every
// 2xx and 429 of /v1/messages carries anthropic-ratelimit-{requests,
// input-tokens,output-tokens,tokens}-{limit,remaining,reset}, read just
// after the request's own charge; the tokens axis is whichever of input and
// output has fewer tokens left. count_tokens answers carry the
// anthropic-ratelimit-requests-* headers of their own bucket.
//
// # Faults
//
// A fault is drawn for each well-formed /v1/messages request for a known
// model, from the queue (QueueFaults, POST /_fake/faults) or else from the
// random rules of Config.Faults. Error faults are answered before the
// buckets and cost nothing; the stream faults run as admitted requests and
// are charged like any other. See FaultKind for what each does.
package fakeanthropic
