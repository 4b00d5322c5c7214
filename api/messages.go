package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/estimate"
	"github.com/sluice-dev/sluice/jobs"
)

// The Anthropic-compatible surface: POST /v1/messages and
// /v1/messages/count_tokens, so an app using an official SDK gets sluice by
// changing only its base URL. The user comes from metadata.user_id; the
// request waits in the same fair queue as a job; errors come in Anthropic's
// shape (anthropicError).

// pingEvery is how often a streamed request gets a `ping` event (while it
// waits, and after), unless Deps.PingEvery says otherwise.
const pingEvery = 5 * time.Second

// isMessagesPath: errors on these routes use Anthropic's error shape.
func isMessagesPath(p string) bool { return strings.HasPrefix(p, "/v1/messages") }

// anthropicType maps sluice's error types to Anthropic's (status, type).
func anthropicType(e *Error) (int, string) {
	switch e.Type {
	case "invalid_request":
		if e.Extra["unknown_model"] == true {
			return http.StatusNotFound, "not_found_error"
		}
		return http.StatusBadRequest, "invalid_request_error"
	case "authentication_error":
		return http.StatusUnauthorized, "authentication_error"
	case "not_found":
		return http.StatusNotFound, "not_found_error"
	case "request_too_large":
		return http.StatusRequestEntityTooLarge, "request_too_large"
	case "rate_limit", "queue_limit":
		return http.StatusTooManyRequests, "rate_limit_error"
	case "overloaded", "upstream_unavailable":
		return 529, "overloaded_error"
	case "conflict":
		return http.StatusConflict, "invalid_request_error"
	case "permission_error":
		return http.StatusForbidden, "permission_error"
	}
	if e.Status >= 500 {
		return e.Status, "api_error"
	}
	return e.Status, "invalid_request_error"
}

// anthropicBody is Anthropic's error body.
func anthropicBody(typ, msg string) map[string]any {
	return map[string]any{"type": "error", "error": map[string]any{"type": typ, "message": msg}}
}

// messagesError rewrites a job-API message for Messages-API clients, whose
// body has no "request" wrapper.
func messagesError(e *Error) string {
	m := strings.ReplaceAll(e.Message, "request.", "")
	return strings.ReplaceAll(m, "user_id is missing: say which of your users this request is for (top-level user_id or metadata.user_id).",
		"metadata.user_id is missing: sluice needs to know which of your users this request is for.")
}

// createMessage is POST /v1/messages.
func (s *Server) createMessage(c *echo.Context) error {
	tenant := tenantOf(c)
	body, err := s.readBodyFor(c, tenant)
	if err != nil {
		return err
	}
	top, err := decodeObject(body, "a Messages API request")
	if err != nil {
		return err
	}
	stream := string(top["stream"]) == "true"
	delete(top, "stream")
	wrapped, _ := json.Marshal(map[string]any{"request": top})
	req, err := parseCreate(wrapped, s.cfg, tenant)
	if err != nil {
		return err
	}
	if err := headerFallback(c, s.cfg, req); err != nil {
		return err
	}
	if req.Class, err = headerClass(c); err != nil {
		return err
	}
	job, _, err := s.admit(c, tenant, req, body)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	sub, err := s.d.Hub.Subscribe(ctx, job.ID)
	if err != nil {
		return err
	}
	defer sub.Close()
	// A synchronous caller that goes away no longer wants the answer.
	defer func() {
		if ctx.Err() != nil && s.stop.Err() == nil {
			if g, ok := s.group(job.Group); ok {
				cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_, _ = s.cancel(cctx, job, g)
			}
		}
	}()
	if stream {
		return s.streamMessage(c, job, sub)
	}
	// Wait for the terminal event (Follow stops after it).
	err = sub.Follow(ctx, "", time.Hour, func() error { return nil }, func(jobs.Event) (bool, error) { return false, nil })
	if err != nil {
		return err
	}
	done, err := s.d.Store.Get(context.WithoutCancel(ctx), job.ID)
	if err != nil {
		return err
	}
	if done.Status == jobs.Succeeded {
		return c.JSONBlob(http.StatusOK, done.Result)
	}
	status, typ, msg := jobOutcomeError(done)
	return c.JSON(status, anthropicBody(typ, msg))
}

// jobOutcomeError is how a job that did not succeed reads to a Messages
// client.
func jobOutcomeError(j *jobs.Job) (int, string, string) {
	switch j.Status {
	case jobs.Canceled:
		return http.StatusBadRequest, "invalid_request_error", "This request was canceled before it finished."
	case jobs.Expired:
		return 529, "overloaded_error", "This request waited longer than its deadline and was dropped without being sent. Please try again."
	}
	msg := "The request failed."
	typ := ""
	if j.Error != nil {
		msg, typ = j.Error.Message, j.Error.Type
	}
	switch typ {
	case "invalid_request":
		return http.StatusBadRequest, "invalid_request_error", msg
	case "not_found":
		return http.StatusNotFound, "not_found_error", msg
	case "request_too_large":
		return http.StatusRequestEntityTooLarge, "request_too_large", msg
	case "upstream_unavailable":
		return 529, "overloaded_error", msg
	case "spend_limit":
		return http.StatusTooManyRequests, "rate_limit_error", msg
	}
	return http.StatusInternalServerError, "api_error", msg
}

// streamMessage answers in Anthropic's own SSE sequence: ping events while
// the request waits, then message_start, every content block as the
// upstream streamed it (relay), and message_delta/message_stop with the
// real stop reason and usage.
func (s *Server) streamMessage(c *echo.Context, job *jobs.Job, sub *jobs.Subscription) error {
	w := c.Response()
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	r := &relay{job: job, send: func(event string, data []byte) error {
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, data); err != nil {
			return err
		}
		return rc.Flush()
	}, implicit: -1, framed: map[int]bool{}}
	ping := func() error { return r.send("ping", []byte(`{"type":"ping"}`)) }
	if err := ping(); err != nil {
		return nil
	}
	ctx := c.Request().Context()
	every := pingEvery
	if s.d.PingEvery > 0 {
		every = s.d.PingEvery
	}
	err := sub.Follow(ctx, "", every, ping, func(ev jobs.Event) (bool, error) {
		switch ev.Name {
		case "failed", "canceled", "expired":
			done, err := s.d.Store.Get(context.WithoutCancel(ctx), job.ID)
			if err != nil {
				return true, err
			}
			_, typ, msg := jobOutcomeError(done)
			return true, r.fail(typ, msg)
		}
		return r.event(ev)
	})
	if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, jobs.ErrHubClosed) {
		s.log.Debug("messages stream ended", "job_id", job.ID, "tenant", job.Tenant, "user_id", job.UserID, "err", err)
	}
	if r.abandoned {
		s.abandon(job)
	}
	return nil
}

// abandon cancels the job of a stream that ended with an error after its
// content began: its client has the error and will never read an answer, so
// the retry sluice would make is not made (or is stopped), and the job is
// charged only what its calls used upstream.
func (s *Server) abandon(job *jobs.Job) {
	g, ok := s.group(job.Group)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	from, err := s.cancel(ctx, job, g)
	var se *jobs.StateError
	switch {
	case err == nil:
		s.log.Info("job canceled: its stream ended with an error after content was sent", "job_id", job.ID, "tenant", job.Tenant, "user_id", job.UserID, "was", from)
	case errors.As(err, &se):
		// It ended meanwhile (its retry already answered, or it was canceled).
	default:
		s.log.Warn("could not cancel the job of a stream that ended with an error; it runs again unread", "job_id", job.ID, "tenant", job.Tenant, "user_id", job.UserID, "err", err)
	}
}

// relay turns a job's events back into the upstream's stream events, in
// order and in their shape: block_start, block_delta and block_stop are the
// upstream's content_block_start, content_block_delta and
// content_block_stop with their type put back; a text delta is a
// text_delta, and a plain text block (which the log does not frame) is
// opened before its first delta and closed when the next block begins or
// the message ends; upstream_event is relayed as it came. message_start is
// sent before the first of them (so a retry before any content stays
// invisible), message_delta and message_stop at the job's success.
type relay struct {
	job   *jobs.Job
	send  func(event string, data []byte) error
	begun bool // message_start was sent
	// abandoned: the stream ended with an error event after its content
	// began (an attempt failed and the job would run again unread).
	abandoned bool
	opened    int          // blocks 0..opened-1 were started
	implicit  int          // the open plain text block (-1: none)
	framed    map[int]bool // blocks opened by block_start, not yet stopped
}

// event relays one job event; it reports whether the stream is over.
func (r *relay) event(ev jobs.Event) (bool, error) {
	switch ev.Name {
	case "delta":
		var d struct {
			Text  string `json:"text"`
			Index int    `json:"index"`
		}
		_ = json.Unmarshal(ev.Data, &d)
		if err := r.openText(d.Index); err != nil {
			return true, err
		}
		b, _ := json.Marshal(map[string]any{"type": "content_block_delta", "index": d.Index,
			"delta": map[string]any{"type": "text_delta", "text": d.Text}})
		return false, r.send("content_block_delta", b)
	case "block_start":
		var d struct {
			Index int `json:"index"`
		}
		_ = json.Unmarshal(ev.Data, &d)
		if err := r.openUpTo(d.Index); err != nil {
			return true, err
		}
		r.opened, r.framed[d.Index] = d.Index+1, true
		return false, r.send("content_block_start", typed("content_block_start", ev.Data))
	case "block_delta":
		var d struct {
			Index int `json:"index"`
		}
		_ = json.Unmarshal(ev.Data, &d)
		if err := r.openText(d.Index); err != nil { // a citation before a plain text block's first text
			return true, err
		}
		return false, r.send("content_block_delta", typed("content_block_delta", ev.Data))
	case "block_stop":
		var d struct {
			Index int `json:"index"`
		}
		_ = json.Unmarshal(ev.Data, &d)
		if err := r.begin(); err != nil {
			return true, err
		}
		delete(r.framed, d.Index)
		return false, r.send("content_block_stop", typed("content_block_stop", ev.Data))
	case "upstream_event":
		var d struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(ev.Data, &d) != nil || !safeEventName(d.Type) {
			return false, nil
		}
		if err := r.begin(); err != nil {
			return true, err
		}
		return false, r.send(d.Type, ev.Data)
	case "retrying":
		if !r.begun {
			return false, nil // nothing sent yet: the next attempt starts afresh
		}
		// What was sent cannot be taken back: end as the upstream would,
		// and give the job up.
		r.abandoned = true
		var d struct {
			Reason string `json:"reason"`
		}
		_ = json.Unmarshal(ev.Data, &d)
		if d.Reason == "overloaded" || d.Reason == "rate_limited" {
			return true, r.fail("overloaded_error", "Overloaded: the upstream failed mid-answer; please send the request again.")
		}
		return true, r.fail("api_error", "The upstream failed mid-answer ("+d.Reason+"); please send the request again.")
	case "succeeded":
		return true, r.finish(ev.Data)
	}
	return false, nil
}

// begin sends message_start once.
func (r *relay) begin() error {
	if r.begun {
		return nil
	}
	r.begun = true
	msg := map[string]any{
		"id": "msg_" + strings.TrimPrefix(r.job.ID, "job_"), "type": "message", "role": "assistant",
		"model": r.job.Model, "content": []any{}, "stop_reason": nil, "stop_sequence": nil,
		"usage": map[string]any{"input_tokens": r.job.CostIn, "output_tokens": 1},
	}
	b, _ := json.Marshal(map[string]any{"type": "message_start", "message": msg})
	return r.send("message_start", b)
}

// openUpTo prepares block index to start: message_start sent, the open
// plain text block closed, and blocks the log skipped (empty text blocks,
// which have no deltas) started and stopped.
func (r *relay) openUpTo(index int) error {
	if err := r.begin(); err != nil {
		return err
	}
	if err := r.closeText(); err != nil {
		return err
	}
	for ; r.opened < index; r.opened++ {
		if err := r.emptyText(r.opened, ""); err != nil {
			return err
		}
	}
	return nil
}

// openText makes sure block index is open: a block not yet started is a
// plain text block (the only kind the log does not frame).
func (r *relay) openText(index int) error {
	if err := r.begin(); err != nil {
		return err
	}
	if index < r.opened {
		return nil
	}
	if err := r.openUpTo(index); err != nil {
		return err
	}
	r.opened, r.implicit = index+1, index
	b, _ := json.Marshal(map[string]any{"type": "content_block_start", "index": index,
		"content_block": map[string]any{"type": "text", "text": ""}})
	return r.send("content_block_start", b)
}

func (r *relay) closeText() error {
	if r.implicit < 0 {
		return nil
	}
	i := r.implicit
	r.implicit = -1
	return r.send("content_block_stop", []byte(`{"type":"content_block_stop","index":`+strconv.Itoa(i)+`}`))
}

// emptyText sends a whole text block (start, its text if any, stop).
func (r *relay) emptyText(index int, text string) error {
	b, _ := json.Marshal(map[string]any{"type": "content_block_start", "index": index,
		"content_block": map[string]any{"type": "text", "text": ""}})
	if err := r.send("content_block_start", b); err != nil {
		return err
	}
	if text != "" {
		b, _ = json.Marshal(map[string]any{"type": "content_block_delta", "index": index,
			"delta": map[string]any{"type": "text_delta", "text": text}})
		if err := r.send("content_block_delta", b); err != nil {
			return err
		}
	}
	return r.send("content_block_stop", []byte(`{"type":"content_block_stop","index":`+strconv.Itoa(index)+`}`))
}

// finish ends the stream with the job's result: blocks the log did not
// carry (empty text blocks; every block of a job run before blocks were
// logged) from the result, then message_delta and message_stop.
func (r *relay) finish(data json.RawMessage) error {
	var v struct {
		Result json.RawMessage `json:"result"`
	}
	_ = json.Unmarshal(data, &v)
	var m struct {
		Content []json.RawMessage          `json:"content"`
		Usage   map[string]json.RawMessage `json:"usage"`
	}
	_ = json.Unmarshal(v.Result, &m)
	var top map[string]json.RawMessage
	_ = json.Unmarshal(v.Result, &top)
	if err := r.begin(); err != nil {
		return err
	}
	if err := r.closeText(); err != nil {
		return err
	}
	for ; r.opened < len(m.Content); r.opened++ {
		raw := m.Content[r.opened]
		var b struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		_ = json.Unmarshal(raw, &b)
		if b.Type == "text" {
			if err := r.emptyText(r.opened, b.Text); err != nil {
				return err
			}
			continue
		}
		if err := r.send("content_block_start", []byte(`{"type":"content_block_start","index":`+strconv.Itoa(r.opened)+`,"content_block":`+string(raw)+`}`)); err != nil {
			return err
		}
		if err := r.send("content_block_stop", []byte(`{"type":"content_block_stop","index":`+strconv.Itoa(r.opened)+`}`)); err != nil {
			return err
		}
	}
	for i := range r.opened {
		if r.framed[i] { // a block whose stop the log lacks
			delete(r.framed, i)
			if err := r.send("content_block_stop", []byte(`{"type":"content_block_stop","index":`+strconv.Itoa(i)+`}`)); err != nil {
				return err
			}
		}
	}
	delete(m.Usage, "cache_creation") // message_delta's usage has no breakdown
	usage, _ := json.Marshal(m.Usage)
	b := []byte(`{"type":"message_delta","delta":` + string(messageDelta(top)) + `,"usage":` + string(usage) + eventFields(top) + `}`)
	if err := r.send("message_delta", b); err != nil {
		return err
	}
	return r.send("message_stop", []byte(`{"type":"message_stop"}`))
}

// startFields are the Message's fields that message_start carries; every
// other top-level field of the result goes in message_delta's delta.
var startFields = map[string]bool{"id": true, "type": true, "role": true, "model": true, "content": true, "usage": true}

// eventLevel are the Message's fields that the API sends on the
// message_delta event itself rather than in its delta.
var eventLevel = map[string]bool{"context_management": true, "input_transformations": true}

// eventFields renders the result's event-level fields (see eventLevel) as
// `,"name":value` pairs for the message_delta event, in name order.
func eventFields(result map[string]json.RawMessage) string {
	var names []string
	for k := range result {
		if eventLevel[k] {
			names = append(names, k)
		}
	}
	slices.Sort(names)
	var b bytes.Buffer
	for _, k := range names {
		b.WriteByte(',')
		writeField(&b, k, result[k])
	}
	return b.String()
}

// writeField writes `"name":value`, a missing value as null.
func writeField(b *bytes.Buffer, name string, v json.RawMessage) {
	kb, _ := json.Marshal(name)
	b.Write(kb)
	b.WriteByte(':')
	if v = bytes.TrimSpace(v); len(v) > 0 {
		b.Write(v)
	} else {
		b.WriteString("null")
	}
}

// messageDelta is the delta of the message_delta that ends a relayed
// stream: stop_reason and stop_sequence (null when the result has none),
// then every other field of the result that message_start did not carry
// (stop_details, container, fields newer than sluice), as the upstream's
// message_delta had them, so that a client's accumulated Message is the
// result.
func messageDelta(result map[string]json.RawMessage) []byte {
	keys := []string{"stop_reason", "stop_sequence"}
	if _, ok := result["stop_details"]; ok {
		keys = append(keys, "stop_details")
	}
	var rest []string
	for k := range result {
		if !startFields[k] && !eventLevel[k] && !slices.Contains(keys, k) {
			rest = append(rest, k)
		}
	}
	slices.Sort(rest)
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range append(keys, rest...) {
		if i > 0 {
			b.WriteByte(',')
		}
		writeField(&b, k, result[k])
	}
	b.WriteByte('}')
	return b.Bytes()
}

func (r *relay) fail(typ, msg string) error {
	b, _ := json.Marshal(anthropicBody(typ, msg))
	return r.send("error", b)
}

// typed is a job event's data (a JSON object) as the upstream event it
// came from: {"type": typ, …data}.
func typed(typ string, data json.RawMessage) []byte {
	d := bytes.TrimSpace(data)
	if len(d) < 2 || d[0] != '{' {
		return []byte(`{"type":"` + typ + `"}`)
	}
	out := make([]byte, 0, len(d)+len(typ)+12)
	out = append(out, `{"type":"`...)
	out = append(out, typ...)
	out = append(out, '"')
	if rest := bytes.TrimSpace(d[1:]); len(rest) > 0 && rest[0] != '}' {
		out = append(out, ',')
	}
	return append(out, d[1:]...)
}

// safeEventName: an upstream event type that can be an SSE event name.
func safeEventName(s string) bool {
	if s == "" || len(s) > 100 {
		return false
	}
	for _, c := range s {
		if !(c == '_' || c == '-' || c == '.' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// decodeObject decodes a body that must be one JSON object (what).
func decodeObject(body []byte, what string) (map[string]json.RawMessage, error) {
	var top map[string]json.RawMessage
	if err := decodeStrict(body, &top); err != nil || top == nil {
		return nil, invalid("", "The request body is not a JSON object (%s).", what)
	}
	return top, nil
}

// countTokens is POST /v1/messages/count_tokens: passed through to the
// upstream (free, with its own rate limit); without one, the local estimate.
func (s *Server) countTokens(c *echo.Context) error {
	tenant := tenantOf(c)
	body, err := s.readBodyFor(c, tenant)
	if err != nil {
		return err
	}
	top, err := decodeObject(body, "a count_tokens request")
	if err != nil {
		return err
	}
	var model string
	if json.Unmarshal(top["model"], &model) != nil || model == "" {
		return invalid("model", "model is missing: name the model to count tokens for.")
	}
	if _, ok := s.cfg.GroupFor(model); !ok {
		return &Error{Status: http.StatusNotFound, Type: "not_found", Message: fmt.Sprintf("The model %q is not served here.", truncate(model, 100))}
	}
	if s.d.Upstream != nil {
		n, err := s.d.Upstream.CountTokens(c.Request().Context(), body)
		if err == nil {
			return c.JSON(http.StatusOK, map[string]int{"input_tokens": n})
		}
		s.log.Warn("count_tokens passthrough failed; answering with the local estimate", "err", err)
	}
	raw := s.d.Estimator.Input(c.Request().Context(), model, estimate.Raw(body))
	return c.JSON(http.StatusOK, map[string]int{"input_tokens": raw})
}
