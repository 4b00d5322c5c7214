// Package upstream calls the Anthropic Messages API for sluice: one streamed
// call at a time through the official Go SDK, with the SDK's own retries off
// (sluice owns retries), and every failure classified into what the worker
// should do about it.
package upstream

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"
)

// Options configure a Client.
type Options struct {
	BaseURL string // e.g. https://api.anthropic.com
	APIKey  string // the account's key; never logged
	// MaxConnsPerHost bounds the pooled connections to the upstream (default 256).
	MaxConnsPerHost int
	// FirstByteTimeout bounds the wait for the answer's headers (0 = none):
	// an upstream that takes the connection and never answers is a failure
	// of the upstream, found in this time rather than the whole attempt's.
	FirstByteTimeout time.Duration
}

// Client is a pooled, retry-free client of the Messages API.
type Client struct {
	sdk  anthropic.Client
	http *http.Client
}

// New builds a Client with its own http.Client: the SDK's default transport
// keeps 2 idle connections per host, far too few for a gateway.
func New(o Options) *Client {
	if o.MaxConnsPerHost <= 0 {
		o.MaxConnsPerHost = 256
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConns = o.MaxConnsPerHost
	tr.MaxIdleConnsPerHost = o.MaxConnsPerHost
	tr.MaxConnsPerHost = o.MaxConnsPerHost
	tr.IdleConnTimeout = 90 * time.Second
	tr.ResponseHeaderTimeout = o.FirstByteTimeout
	hc := &http.Client{Transport: tr}
	sdk := anthropic.NewClient(
		option.WithoutEnvironmentDefaults(), // only cmd/sluice reads the environment
		option.WithBaseURL(o.BaseURL),
		option.WithAPIKey(o.APIKey),
		option.WithMaxRetries(0),
		option.WithHTTPClient(hc),
	)
	return &Client{sdk: sdk, http: hc}
}

// Close releases idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// Result is a finished call.
type Result struct {
	Message json.RawMessage // the upstream Message, as the non-streaming API returns it
	Text    string          // its text blocks joined
	Usage   Usage
}

// Usage is the token usage the upstream reported.
type Usage struct {
	InputTokens              int `json:"input_tokens"`
	OutputTokens             int `json:"output_tokens"`
	CacheCreationInputTokens int `json:"cache_creation_input_tokens"`
	CacheReadInputTokens     int `json:"cache_read_input_tokens"`
	// CacheCreation splits CacheCreationInputTokens by cache lifetime
	// (nil when the upstream did not).
	CacheCreation *struct {
		Ephemeral5m int `json:"ephemeral_5m_input_tokens"`
		Ephemeral1h int `json:"ephemeral_1h_input_tokens"`
	} `json:"cache_creation,omitempty"`
}

// PartKind says what a Part of a streamed answer is.
type PartKind int

const (
	// PartText is a text_delta of a text block: Index and Text.
	PartText PartKind = iota + 1
	// PartBlockStart: a content block other than a plain text block began
	// (any block whose content_block_start says more than
	// {"type":"text","text":""}): Index, and Raw the content_block as sent.
	PartBlockStart
	// PartBlockDelta: a delta other than text_delta (input_json_delta,
	// thinking_delta, signature_delta, citations_delta, or a type sluice
	// does not know): Index, and Raw the delta object as sent.
	PartBlockDelta
	// PartBlockStop: a block that began with PartBlockStart ended: Index.
	PartBlockStop
	// PartEvent: an event of a type sluice does not know: Raw, the whole
	// event as sent.
	PartEvent
)

// Part is one piece of an answer as the upstream streams it, in the order
// it came. A plain text block has no start and stop parts: its text parts
// carry its index.
type Part struct {
	Kind  PartKind
	Index int
	Text  string
	Raw   json.RawMessage
}

// knownEvents are the stream events the accumulator understands; others
// are passed on as PartEvent (ping and error never reach here: the SDK
// drops the first and turns the second into an error).
var knownEvents = map[string]bool{"message_start": true, "message_delta": true, "message_stop": true,
	"content_block_start": true, "content_block_delta": true, "content_block_stop": true}

// Stream sends body (a complete Messages request; stream is forced on),
// calls onStart with the response headers and message_start's usage (the
// input, cache writes and cache reads are final then) as soon as the
// stream begins (the rate-limit headers are freshest then), and onPart for
// every part of the content as the model writes it. A stream that ends
// without message_stop is an error (Kind Cut), never a short success.
func (c *Client) Stream(ctx context.Context, body []byte, onStart func(http.Header, Usage), onPart func(Part)) (*Result, error) {
	var resp *http.Response
	stream := c.sdk.Messages.NewStreaming(ctx, anthropic.MessageNewParams{},
		option.WithRequestBody("application/json", body),
		option.WithResponseInto(&resp),
	)
	defer stream.Close()
	acc := newAccumulator()
	started := false
	framed := map[int]bool{} // blocks announced by PartBlockStart
	for stream.Next() {
		ev := stream.Current()
		if err := acc.add(ev.Type, []byte(ev.RawJSON())); err != nil {
			return nil, &Error{Kind: KindCut, Message: "the upstream sent a malformed stream: " + err.Error()}
		}
		if !started {
			started = true
			if onStart != nil && resp != nil {
				onStart(resp.Header, acc.partialUsage())
			}
		}
		if onPart == nil {
			continue
		}
		i := int(ev.Index)
		switch ev.Type {
		case "content_block_start":
			if raw := ev.ContentBlock.RawJSON(); !plainText(raw) {
				framed[i] = true
				onPart(Part{Kind: PartBlockStart, Index: i, Raw: json.RawMessage(raw)})
			}
		case "content_block_delta":
			if ev.Delta.Type == "text_delta" {
				if ev.Delta.Text != "" {
					onPart(Part{Kind: PartText, Index: i, Text: ev.Delta.Text})
				}
				continue
			}
			onPart(Part{Kind: PartBlockDelta, Index: i, Raw: json.RawMessage(ev.JSON.Delta.Raw())})
		case "content_block_stop":
			if framed[i] {
				delete(framed, i)
				onPart(Part{Kind: PartBlockStop, Index: i})
			}
		default:
			if !knownEvents[ev.Type] {
				onPart(Part{Kind: PartEvent, Raw: json.RawMessage(ev.RawJSON())})
			}
		}
	}
	if err := stream.Err(); err != nil {
		return nil, withPartial(classify(ctx, err, resp), acc)
	}
	if ctx.Err() != nil {
		return nil, withPartial(classify(ctx, ctx.Err(), resp), acc)
	}
	if !acc.stopped {
		return nil, withPartial(&Error{Kind: KindCut, Message: "the upstream stream ended before message_stop"}, acc)
	}
	msg, text, usage, err := acc.result()
	if err != nil {
		return nil, &Error{Kind: KindCut, Message: "the upstream sent a malformed stream: " + err.Error()}
	}
	return &Result{Message: msg, Text: text, Usage: usage}, nil
}

// Kind is what a failure means for the job.
type Kind int

const (
	// KindRateLimited: a 429 with retry-after. Wait, then try again; not the
	// job's fault, so it does not use up the job's attempts.
	KindRateLimited Kind = iota + 1
	// KindSpendLimit: the account's spend limit; retrying is pointless.
	KindSpendLimit
	// KindRetryable: 529, 500, 503, 504, a dropped connection, a cut stream,
	// an error event mid-stream. Back off with jitter and try again.
	KindRetryable
	// KindCut: the stream ended early or was malformed. Retryable.
	KindCut
	// KindFatal: the request itself was refused (400, 401, 402, 403, 404,
	// 413). Fail the job at once.
	KindFatal
	// KindCanceled: our own context ended (shutdown or cancel).
	KindCanceled
)

// Retryable reports whether another attempt may succeed.
func (k Kind) Retryable() bool {
	return k == KindRateLimited || k == KindRetryable || k == KindCut
}

// Error is a classified upstream failure.
type Error struct {
	Kind       Kind
	Status     int           // HTTP status; 0 for connection errors
	Type       string        // the upstream's error.type (e.g. overloaded_error)
	Code       string        // error.details.error_code, if any
	Message    string        // the upstream's message, or what happened
	RetryAfter time.Duration // from retry-after, 0 if absent
	RequestID  string
	Header     http.Header // the response headers, when there was a response
	// Started: the stream had begun (message_start arrived), so the call
	// was billed; Partial is what it had used by then (input from
	// message_start, output estimated from the text received).
	Started bool
	Partial Usage
	// Unsent: the request never reached the upstream (the connection could
	// not be made), so nothing can have been billed.
	Unsent bool
	Err    error
}

// Infra reports whether the failure is the upstream's state rather than
// the request's: the connection failed, no answer came before the first
// byte, or the upstream answered 500, 502, 503, 504 or 529 (or an
// overloaded or api error before the answer began). Such failures say
// nothing about the request, so they do not use up its attempts; enough of
// them in a row put the model group into outage.
func (e *Error) Infra() bool {
	if e.Started || e.Kind == KindCanceled {
		return false
	}
	switch e.Status {
	case 0:
		return e.Kind == KindRetryable
	case 500, 502, 503, 504, 529:
		return true
	case http.StatusOK:
		return e.Type == "overloaded_error" || e.Type == "api_error"
	}
	return false
}

func withPartial(err error, acc *accumulator) error {
	var e *Error
	if errors.As(err, &e) && acc.msg != nil {
		e.Started = true
		e.Partial = acc.partialUsage()
	}
	return err
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("upstream")
	if e.Status != 0 {
		fmt.Fprintf(&b, " %d", e.Status)
	}
	if e.Type != "" {
		b.WriteString(" " + e.Type)
	}
	if e.Code != "" {
		b.WriteString(" (" + e.Code + ")")
	}
	if e.Message != "" {
		b.WriteString(": " + e.Message)
	}
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

// Reason is a short machine word for the failure (SSE `retrying` reason).
func (e *Error) Reason() string {
	switch {
	case e.Kind == KindRateLimited:
		return "rate_limited"
	case e.Kind == KindCut:
		return "stream_interrupted"
	case e.Status == 529 || e.Type == "overloaded_error":
		return "overloaded"
	case e.Status == 0:
		return "connection_error"
	case e.Status == 504:
		return "timeout"
	}
	return "upstream_error"
}

func classify(ctx context.Context, err error, resp *http.Response) error {
	if ctx.Err() != nil && !isAPIError(err) {
		return &Error{Kind: KindCanceled, Message: "the call was stopped", Err: ctx.Err()}
	}
	var ae *anthropic.Error
	if !errors.As(err, &ae) {
		msg := "the connection to the upstream failed"
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			msg = "the upstream did not answer in time"
		}
		var oe *net.OpError
		unsent := errors.As(err, &oe) && oe.Op == "dial"
		if unsent {
			msg = "could not connect to the upstream"
		}
		return &Error{Kind: KindRetryable, Message: msg, Unsent: unsent, Err: err}
	}
	e := &Error{Status: ae.StatusCode, Type: string(ae.Type()), Code: string(ae.ErrorCode()), Message: ae.Message, RequestID: ae.RequestID, Err: err}
	h := http.Header(nil)
	if ae.Response != nil {
		h = ae.Response.Header
	} else if resp != nil {
		h = resp.Header
	}
	e.Header = h
	if h != nil {
		e.RetryAfter = parseRetryAfter(h.Get("retry-after"))
		if e.RequestID == "" {
			e.RequestID = h.Get("request-id")
		}
	}
	switch s := ae.StatusCode; {
	case s == http.StatusOK: // an `event: error` inside a stream that began well
		e.Kind = KindRetryable
		if e.Type == "invalid_request_error" {
			e.Kind = KindFatal
		}
	case s == http.StatusTooManyRequests:
		switch {
		case e.Code == "enforced_spend_limit_reached":
			e.Kind = KindSpendLimit
		case e.RetryAfter == 0 && h != nil && strings.EqualFold(h.Get("x-should-retry"), "false"):
			e.Kind = KindSpendLimit
		default:
			e.Kind = KindRateLimited
			if e.RetryAfter == 0 {
				e.RetryAfter = time.Second
			}
		}
	case s == 529 || s == 500 || s == 502 || s == 503 || s == 504 || s == 408:
		e.Kind = KindRetryable
	default:
		e.Kind = KindFatal
	}
	return e
}

func isAPIError(err error) bool {
	var ae *anthropic.Error
	return errors.As(err, &ae)
}

func parseRetryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil && s >= 0 {
		return time.Duration(s * float64(time.Second))
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := time.Until(t); d > 0 {
			return d
		}
	}
	return 0
}

// UserHash is the opaque metadata.user_id sent upstream for a tenant's user:
// stable (so the upstream can spot abuse by one user) and not reversible.
func UserHash(tenant, user string) string {
	sum := sha256.Sum256([]byte("sluice\x00" + tenant + "\x00" + user))
	return "u_" + hex.EncodeToString(sum[:16])
}

// countTokensFields are the Messages fields count_tokens accepts.
var countTokensFields = []string{"model", "messages", "system", "tools", "tool_choice", "thinking"}

// CountTokens asks the upstream's free count_tokens endpoint for the exact
// input tokens of a Messages request body.
func (c *Client) CountTokens(ctx context.Context, body []byte) (int, error) {
	var req map[string]json.RawMessage
	if err := json.Unmarshal(body, &req); err != nil {
		return 0, err
	}
	keep := make(map[string]json.RawMessage, len(countTokensFields))
	for _, f := range countTokensFields {
		if v, ok := req[f]; ok {
			keep[f] = v
		}
	}
	b, err := json.Marshal(keep)
	if err != nil {
		return 0, err
	}
	res, err := c.sdk.Messages.CountTokens(ctx, anthropic.MessageCountTokensParams{},
		option.WithRequestBody("application/json", b))
	if err != nil {
		return 0, classify(ctx, err, nil)
	}
	return int(res.InputTokens), nil
}

// plainText reports whether a content_block_start's block is an empty text
// block and nothing more: {"type":"text","text":""}.
func plainText(raw string) bool {
	var m map[string]json.RawMessage
	if json.Unmarshal([]byte(raw), &m) != nil || len(m) != 2 {
		return false
	}
	return string(m["type"]) == `"text"` && string(m["text"]) == `""`
}
