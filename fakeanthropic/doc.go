// Package fakeanthropic is a faithful stand-in for the Anthropic Messages API,
// for tests, for `sluice dev` and the demo, for the load tester, and for
// operators who rehearse failures. It behaves as the Anthropic API does:
// both auth header styles, the exact JSON and SSE wire
// format the Go SDK parses, per-group token buckets with the real
// anthropic-ratelimit-* headers and 429s, both OTPM accounting modes (the
// current one, output counted as produced, by default), prompt caching,
// the Admin API's Rate Limits route, paced output and injected faults.
//
// # API routes
//
//	POST /v1/messages                   Messages, streaming or not
//	POST /v1/messages/count_tokens      {"input_tokens": N}; its own RPM bucket per group
//	GET  /v1/organizations/rate_limits  the groups' limits (Admin API; see below)
//	anything else                       404 not_found_error
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
//	POST /_fake/cache/clear
//	                     ClearCache: empties the prompt cache; answers
//	                     {"cleared": N}, the live entries dropped.
//	POST /_fake/limits   SetGroupLimits, with the body
//	                     {"group":"claude","rpm":10,"input_tpm":5000,"output_tpm":1000}
//	                     (0 or absent: unchanged); answers the group's limits
//	                     now in the same shape, 404 for an unknown group.
//	POST /_fake/batches/outage
//	                     SetBatchOutage, with the body {"status":529}: every
//	                     /v1/messages/batches request answers that status
//	                     (429, 500, 503 or 529; 0 ends it) with the API's
//	                     error; answers 204, or 400 for another status.
//
// # Token counting and replies
//
// Input tokens follow CountTokens: 8 framing tokens, plus ceil(bytes/4) of
// the compact JSON of every tool, of every text of the system prompt and the
// messages (other blocks: of their compact JSON), plus 4 per message;
// cache_control members cost nothing. A reply is made of deterministic words,
// one word and a space per output token, so that text deltas, words and
// usage.output_tokens agree. Its length is Config.ReplyTokens unless the
// last user message says otherwise with a directive; max_tokens always caps
// it (stop_reason "max_tokens"):
//
//	[[reply_tokens=N]]  reply with N output tokens
//	[[cache_write=N]]   add N cache_creation_input_tokens (they count toward ITPM)
//	[[cache_read=N]]    add N cache_read_input_tokens (they do not, by default)
//	[[latency_ms=N]]    wait N ms more (on top of Config.Latency) before the answer begins
//	[[tool_use=NAME]]   call the request's tool NAME ([[tool_use]]: its first tool)
//	[[thinking_tokens=N]]  with thinking enabled, N words of thinking (default 8, at most budget_tokens)
//	[[redacted_thinking]]  with thinking enabled, a redacted_thinking block after the thinking
//	[[citations]]       the text block ends with a citations_delta
//	[[unknown_event]]   an event (content_block_future) and a block (future_block) of unknown types
//	[[delta_fields]]    message_delta's delta carries more than stop_reason and stop_sequence
//
// The cache directives describe a cached prefix on top of the counted
// prompt, on top of what real prompt caching (below) reports: they do not
// take anything from input_tokens. Directives are read from the last user
// message's text, the contents of its tool results included.
//
// # Content blocks
//
// A reply's blocks, in order: with thinking enabled ({"type":"enabled",
// "budget_tokens":N} or {"type":"adaptive"}) a thinking block (one
// thinking_delta per word, then a signature_delta), and a redacted_thinking
// block with [[redacted_thinking]]; with [[unknown_event]] a future_block
// (one future_delta); a text block (one text_delta per word, and a
// citations_delta with [[citations]]), left out when the reply is only a
// tool call; and a tool call when [[tool_use]] or tool_choice (any, tool)
// asks for one: a tool_use block (input {} at its start) whose input, made
// from the tool's input_schema, streams as an empty input_json_delta and
// then pieces of up to 8 bytes, one output token each, with stop_reason
// "tool_use". A tool call that does not fit in max_tokens is left out. The
// non-streaming message holds the same blocks whole.
//
// With [[delta_fields]], message_delta's delta carries, after stop_reason
// and stop_sequence, the newer fields the API may send there:
// "stop_details": null, a "container" ({"id": "container_011…",
// "expires_at", "skills": []}; a fixed expiry) and "future_field" (a field
// of a name no client knows); the message_delta event itself carries
// "context_management": {"applied_edits": []} beside its delta, as the API
// does; the non-streaming message (and a batch result) has all of these at
// its top level.
//
// Requests are checked as the API checks them: tools have a name and (client
// tools) an input_schema; tool_choice names a tool of the request; thinking's
// budget_tokens is at least 1,024 and below max_tokens, and not with a forced
// tool_choice; every tool_use of an assistant message is answered by a
// tool_result in the next (user) message, and every tool_result answers a
// tool_use of the message before it; a thinking block sent back keeps the
// signature the fake gave it.
//
// # Prompt caching
//
// A cache_control {"type":"ephemeral"} (optionally "ttl":"5m" or "1h"; 5m
// by default) on an entry of tools, a system text block or a block of a
// message's content marks a breakpoint; more than 4 get 400
// invalid_request_error ("A maximum of 4 blocks with cache_control may be
// provided. Found N."), and a malformed one names its field. A breakpoint's
// prefix runs tools, system, messages, up to and including its block,
// counted as above (framing included). A prefix shorter than the group's
// Group.CacheMinTokens (default 1,024 tokens, 2,048 for models whose name
// contains "haiku") is not cached.
//
// At admission the longest live prefix in the cache is read and its
// lifetime refreshed (to at least now plus its ttl); every later breakpoint
// is written. The usage then splits the prompt's CountTokens into
//
//	cache_read_input_tokens      the prefix read
//	cache_creation_input_tokens  the tokens past it up to the last breakpoint written
//	input_tokens                 the rest, after the last breakpoint read or written
//
// with cache_creation {"ephemeral_5m_input_tokens","ephemeral_1h_input_tokens"}
// splitting the creation by the ttl of the breakpoint that writes each
// part. The same usage is in the JSON message and in message_start;
// message_delta repeats the three counts (without the breakdown) with the
// final output_tokens. An entry written by a call becomes readable when
// that call's answer begins, just before its message_start (for a
// non-streaming call, before its first output token): two calls that both
// start before the first one begins both write. A call refused (429, a
// fault) or canceled before its answer begins reads and writes nothing.
// count_tokens ignores caching. The cache is one per server (one
// organization), keyed by the exact model name and the prefix's content;
// lifetimes run on Config.Clock. ClearCache (POST /_fake/cache/clear)
// empties it. Simplifications: only the breakpoints are looked up (the API
// also checks up to 20 blocks before each), and mixing ttls in any order is
// accepted.
//
// # Rate limits
//
// Each Group has three token buckets (requests, input tokens, output tokens)
// whose capacity is the per-minute limit and which refill continuously at
// limit/60 per second on Config.Clock. A request that does not fit gets 429
// rate_limit_error naming the limit, retry-after (whole seconds until it
// would fit, at least 1) and x-should-retry: true. In OTPMReserve mode
// max_tokens is reserved at admission and the unused part given back at the
// end; in OTPMRealtime mode (the default, the API's current rule) each token
// is taken as it is produced, max_tokens is not used, and a request is
// refused only while the output bucket is at or below zero. ITPM counts
// input_tokens + cache_creation_input_tokens, and cache reads too on groups
// with Group.CountCacheReads (legacy models).
//
// Every 2xx and 429 of /v1/messages carries anthropic-ratelimit-{requests,
// input-tokens,output-tokens,tokens}-{limit,remaining,reset}, read just
// after the request's own charge; the tokens axis is whichever of input and
// output has fewer tokens left. count_tokens answers carry the
// anthropic-ratelimit-requests-* headers of their own bucket.
// SetGroupLimits (POST /_fake/limits) changes a group's limits while the
// server runs: enforced, in the headers and in the Rate Limits API at once.
//
// # Rate Limits API
//
// GET /v1/organizations/rate_limits takes an Admin API key (Config.AdminKeys;
// with none configured, any key starting with sk-ant-admin) in x-api-key
// and an anthropic-version header. A missing or unknown key gets 401
// authentication_error; a key the Messages API accepts gets 403
// permission_error. It answers the groups' limits now, one entry per group:
//
//	{"data":[{"type":"rate_limit","id":"rl_…",
//	          "group":{"type":"model_group","id":"rlg_…","display_name":"claude"},
//	          "models":["claude-*"],
//	          "limits":[{"type":"requests_per_minute","value":50},
//	                    {"type":"input_tokens_per_minute_cache_aware","value":30000},
//	                    {"type":"output_tokens_per_minute","value":8000}]}],
//	 "next_page":null}
//
// models are Group.ReportedModels (default Group.Models as written); the
// input limit's type is input_tokens_per_minute on groups that count cache
// reads. Query parameters: model (the entry containing it, by name or
// pattern; 404 if none), group_type (model_group; the other types list
// nothing), limit (1 to 1,000) and page (the cursor of next_page). admin.go
// says which parts of this shape are verified against the official SDK and
// which are assumed.
//
// # Faults
//
// A fault is drawn for each well-formed /v1/messages request for a known
// model, from the queue (QueueFaults, POST /_fake/faults) or else from the
// random rules of Config.Faults. Error faults are answered before the
// buckets and cost nothing; the stream faults run as admitted requests and
// are charged like any other. See FaultKind for what each does.
package fakeanthropic
