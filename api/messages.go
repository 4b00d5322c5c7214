package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
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

// pingEvery is how often a waiting streamed request gets a `ping` event.
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
// the request waits, then message_start, one text block's deltas, and
// message_delta/message_stop with the real stop reason and usage.
func (s *Server) streamMessage(c *echo.Context, job *jobs.Job, sub *jobs.Subscription) error {
	w := c.Response()
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	send := func(event string, data any) error {
		b, _ := json.Marshal(data)
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, b); err != nil {
			return err
		}
		return rc.Flush()
	}
	ping := func() error { return send("ping", map[string]string{"type": "ping"}) }
	if err := ping(); err != nil {
		return nil
	}
	ctx := c.Request().Context()
	begun := false
	begin := func() error {
		if begun {
			return nil
		}
		begun = true
		msg := map[string]any{
			"id": "msg_" + strings.TrimPrefix(job.ID, "job_"), "type": "message", "role": "assistant",
			"model": job.Model, "content": []any{}, "stop_reason": nil, "stop_sequence": nil,
			"usage": map[string]any{"input_tokens": job.CostIn, "output_tokens": 1},
		}
		if err := send("message_start", map[string]any{"type": "message_start", "message": msg}); err != nil {
			return err
		}
		return send("content_block_start", map[string]any{"type": "content_block_start", "index": 0,
			"content_block": map[string]any{"type": "text", "text": ""}})
	}
	fail := func(typ, msg string) error {
		return send("error", anthropicBody(typ, msg))
	}
	err := sub.Follow(ctx, "", pingEvery, ping, func(ev jobs.Event) (bool, error) {
		switch ev.Name {
		case "delta":
			var d struct{ Text string }
			_ = json.Unmarshal(ev.Data, &d)
			if err := begin(); err != nil {
				return true, err
			}
			return false, send("content_block_delta", map[string]any{"type": "content_block_delta", "index": 0,
				"delta": map[string]any{"type": "text_delta", "text": d.Text}})
		case "retrying":
			if begun {
				// Text already sent cannot be taken back: end as the upstream would.
				return true, fail("overloaded_error", "The upstream failed mid-answer; please send the request again.")
			}
		case "succeeded":
			var v struct {
				Result json.RawMessage `json:"result"`
			}
			_ = json.Unmarshal(ev.Data, &v)
			var m struct {
				StopReason   *string         `json:"stop_reason"`
				StopSequence *string         `json:"stop_sequence"`
				Usage        json.RawMessage `json:"usage"`
			}
			_ = json.Unmarshal(v.Result, &m)
			if err := begin(); err != nil {
				return true, err
			}
			if err := send("content_block_stop", map[string]any{"type": "content_block_stop", "index": 0}); err != nil {
				return true, err
			}
			if err := send("message_delta", map[string]any{"type": "message_delta",
				"delta": map[string]any{"stop_reason": m.StopReason, "stop_sequence": m.StopSequence}, "usage": m.Usage}); err != nil {
				return true, err
			}
			return true, send("message_stop", map[string]any{"type": "message_stop"})
		case "failed", "canceled", "expired":
			done, err := s.d.Store.Get(context.WithoutCancel(ctx), job.ID)
			if err != nil {
				return true, err
			}
			_, typ, msg := jobOutcomeError(done)
			return true, fail(typ, msg)
		}
		return false, nil
	})
	if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, jobs.ErrHubClosed) {
		s.log.Debug("messages stream ended", "job_id", job.ID, "tenant", job.Tenant, "user_id", job.UserID, "err", err)
	}
	return nil
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
