package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/estimate"
)

// createRequest is a validated POST /v1/jobs body.
type createRequest struct {
	UserID          string
	Model           string
	Group           *config.ModelGroup
	MaxTokens       int
	DeadlineSeconds float64         // 0 = none
	Request         json.RawMessage // the Messages body to send: max_tokens filled in, stream and metadata removed
	Metadata        json.RawMessage // the client's own metadata, kept with the job
	RawInput        int             // estimate.Raw of the request, from the parsed parts
}

const (
	maxUserIDLen = 256
	// maxMaxTokens bounds max_tokens to what any current model could give.
	maxMaxTokens = 1_000_000
	// maxDeadline is the longest deadline_seconds a job may ask for (7 days).
	maxDeadline = 7 * 24 * 3600
)

var jobFields = map[string]bool{"user_id": true, "request": true, "deadline_seconds": true, "metadata": true}

// parseCreate validates a POST /v1/jobs body. Every refusal names the field
// (as a JSON path) and says what would be accepted.
func parseCreate(body []byte, cfg *config.Config, tenant *config.Tenant) (*createRequest, error) {
	if !utf8.Valid(body) {
		return nil, invalid("", "The request body is not valid UTF-8 text. Send JSON encoded as UTF-8.")
	}
	var top map[string]json.RawMessage
	if err := decodeStrict(body, &top); err != nil {
		return nil, invalid("", "The request body is not a JSON object: %s.", jsonProblem(err))
	}
	if top == nil {
		return nil, invalid("", "The request body must be a JSON object with user_id and request.")
	}
	for k := range top {
		if !jobFields[k] {
			return nil, invalid(k, "Unknown field %q. A job takes user_id, request, deadline_seconds and metadata.", truncate(k, 64))
		}
	}
	out := &createRequest{}
	rawReq, ok := top["request"]
	if !ok || isNull(rawReq) {
		return nil, invalid("request", "The request field is missing: it holds the Messages API body (model, max_tokens, messages).")
	}
	var req map[string]json.RawMessage
	if err := json.Unmarshal(rawReq, &req); err != nil || req == nil {
		return nil, invalid("request", "The request field must be a JSON object (a Messages API body).")
	}

	// user_id: top level or request.metadata.user_id; both must agree.
	var topUser, mdUser string
	var haveTop, haveMD bool
	if raw, ok := top["user_id"]; ok && !isNull(raw) {
		if err := json.Unmarshal(raw, &topUser); err != nil {
			return nil, invalid("user_id", "user_id must be a string.")
		}
		haveTop = true
	}
	if raw, ok := req["metadata"]; ok && !isNull(raw) {
		var md map[string]json.RawMessage
		if err := json.Unmarshal(raw, &md); err != nil || md == nil {
			return nil, invalid("request.metadata", "request.metadata must be a JSON object.")
		}
		if u, ok := md["user_id"]; ok && !isNull(u) {
			if err := json.Unmarshal(u, &mdUser); err != nil {
				return nil, invalid("request.metadata.user_id", "request.metadata.user_id must be a string.")
			}
			haveMD = true
		}
	}
	switch {
	case haveTop && haveMD && topUser != mdUser:
		return nil, invalid("user_id", "user_id and request.metadata.user_id are both given and differ; give one, or the same value in both.")
	case haveTop:
		out.UserID = topUser
	case haveMD:
		out.UserID = mdUser
	default:
		return nil, invalid("user_id", "user_id is missing: say which of your users this request is for (top-level user_id or request.metadata.user_id).")
	}
	field := "user_id"
	if !haveTop {
		field = "request.metadata.user_id"
	}
	if err := checkUserID(field, out.UserID); err != nil {
		return nil, err
	}

	// model
	rawModel, ok := req["model"]
	if !ok || isNull(rawModel) {
		return nil, invalid("request.model", "request.model is missing. Name a model such as %q.", exampleModel(cfg))
	}
	if err := json.Unmarshal(rawModel, &out.Model); err != nil || out.Model == "" {
		return nil, invalid("request.model", "request.model must be a non-empty string naming a model.")
	}
	g, ok := cfg.GroupFor(out.Model)
	if !ok {
		e := invalid("request.model", "The model %q is not served here. Models served: %s.", truncate(out.Model, 100), modelList(cfg))
		e.Extra = map[string]any{"unknown_model": true}
		return nil, e
	}
	out.Group = g

	// max_tokens
	if raw, ok := req["max_tokens"]; ok && !isNull(raw) {
		n, err := positiveInt(raw, maxMaxTokens)
		if err != nil {
			return nil, invalid("request.max_tokens", "request.max_tokens must be a whole number from 1 to %d.", maxMaxTokens)
		}
		out.MaxTokens = n
	} else {
		out.MaxTokens = tenant.DefaultMaxTokens
		req["max_tokens"] = json.RawMessage(fmt.Sprint(out.MaxTokens))
	}

	// The tenant's cap on max_tokens.
	if c := tenant.MaxTokensCap; c > 0 && out.MaxTokens > c {
		if tenant.MaxTokensPolicy == "reject" {
			return nil, invalid("request.max_tokens", "request.max_tokens is %d; the most allowed here is %d. Ask for %d or less.", out.MaxTokens, c, c)
		}
		out.MaxTokens = c // clamp: the job shows the value used
		req["max_tokens"] = json.RawMessage(fmt.Sprint(c))
	}

	// messages
	contents, err := checkMessages(req["messages"], tenant.MaxMessages)
	if err != nil {
		return nil, err
	}
	out.RawInput = estimate.RawParts(req["system"], contents, req["tools"])

	// stream: the job API streams through /v1/jobs/{id}/events instead.
	if raw, ok := req["stream"]; ok {
		var b bool
		if err := json.Unmarshal(raw, &b); err != nil || b {
			return nil, invalid("request.stream", "request.stream is not used here: follow GET /v1/jobs/{id}/events for live text, or use POST /v1/messages with stream: true.")
		}
		delete(req, "stream")
	}
	delete(req, "metadata") // the upstream gets an opaque user hash instead

	if raw, ok := top["deadline_seconds"]; ok && !isNull(raw) {
		var d float64
		if err := json.Unmarshal(raw, &d); err != nil || d <= 0 || d > maxDeadline || math.IsNaN(d) {
			return nil, invalid("deadline_seconds", "deadline_seconds must be a number of seconds greater than 0 and at most %d (7 days).", maxDeadline)
		}
		out.DeadlineSeconds = d
	}
	if raw, ok := top["metadata"]; ok && !isNull(raw) {
		var md map[string]json.RawMessage
		if err := json.Unmarshal(raw, &md); err != nil || md == nil {
			return nil, invalid("metadata", "metadata must be a JSON object; it is kept with the job and returned as given.")
		}
		if len(raw) > 16<<10 {
			return nil, invalid("metadata", "metadata is %d bytes; at most 16 KiB is kept with a job.", len(raw))
		}
		out.Metadata = raw
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, invalid("request", "The request could not be re-encoded: %v.", err)
	}
	out.Request = b
	return out, nil
}

// checkMessages validates request.messages and returns each one's content.
func checkMessages(raw json.RawMessage, max int) ([]json.RawMessage, error) {
	if raw == nil || isNull(raw) {
		return nil, invalid("request.messages", "request.messages is missing: give at least one message, e.g. [{\"role\": \"user\", \"content\": \"Hello\"}].")
	}
	var msgs []map[string]json.RawMessage
	if err := json.Unmarshal(raw, &msgs); err != nil {
		return nil, invalid("request.messages", "request.messages must be an array of {role, content} objects.")
	}
	if len(msgs) == 0 {
		return nil, invalid("request.messages", "request.messages is empty: give at least one message.")
	}
	if max > 0 && len(msgs) > max {
		return nil, invalid("request.messages", "request.messages holds %d messages; at most %d are allowed in one request. Drop the oldest ones.", len(msgs), max)
	}
	contents := make([]json.RawMessage, len(msgs))
	for i, m := range msgs {
		path := fmt.Sprintf("request.messages[%d]", i)
		if m == nil {
			return nil, invalid(path, "%s must be an object with role and content.", path)
		}
		var role string
		if err := json.Unmarshal(m["role"], &role); err != nil || (role != "user" && role != "assistant") {
			return nil, invalid(path+".role", "%s.role must be \"user\" or \"assistant\".", path)
		}
		c, ok := m["content"]
		contents[i] = c
		if !ok || isNull(c) {
			return nil, invalid(path+".content", "%s.content is missing: give a string or an array of content blocks.", path)
		}
		switch firstByte(c) {
		case '"':
			var s string
			if err := json.Unmarshal(c, &s); err != nil {
				return nil, invalid(path+".content", "%s.content is not a valid string.", path)
			}
			if s == "" && i == len(msgs)-1 && role == "user" {
				return nil, invalid(path+".content", "%s.content is empty: the last user message needs some text.", path)
			}
		case '[':
			var blocks []map[string]json.RawMessage
			if err := json.Unmarshal(c, &blocks); err != nil {
				return nil, invalid(path+".content", "%s.content must be a string or an array of content blocks (objects with a type).", path)
			}
			for j, b := range blocks {
				var typ string
				if b == nil || json.Unmarshal(b["type"], &typ) != nil || typ == "" {
					return nil, invalid(fmt.Sprintf("%s.content[%d].type", path, j), "Every content block needs a type, such as \"text\".")
				}
			}
		default:
			return nil, invalid(path+".content", "%s.content must be a string or an array of content blocks.", path)
		}
	}
	return contents, nil
}

// checkUserID: 1–256 printable characters.
func checkUserID(field, u string) error {
	if u == "" {
		return invalid(field, "%s is empty: give the id of your end user (1 to %d printable characters).", field, maxUserIDLen)
	}
	if n := utf8.RuneCountInString(u); n > maxUserIDLen {
		return invalid(field, "%s is %d characters long; the limit is %d.", field, n, maxUserIDLen)
	}
	for _, r := range u {
		if !unicode.IsPrint(r) {
			return invalid(field, "%s contains a control or non-printable character; use printable characters only.", field)
		}
	}
	return nil
}

func positiveInt(raw json.RawMessage, max int) (int, error) {
	var n json.Number
	d := json.NewDecoder(bytes.NewReader(raw))
	d.UseNumber()
	if err := d.Decode(&n); err != nil {
		return 0, err
	}
	i, err := n.Int64()
	if err != nil || i < 1 || i > int64(max) {
		return 0, fmt.Errorf("out of range")
	}
	return int(i), nil
}

// decodeStrict decodes exactly one JSON value with nothing after it.
func decodeStrict(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	if err := d.Decode(v); err != nil {
		return err
	}
	if d.More() {
		return fmt.Errorf("unexpected data after the JSON value")
	}
	var extra json.RawMessage
	if err := d.Decode(&extra); err == nil {
		return fmt.Errorf("unexpected data after the JSON value")
	}
	return nil
}

func jsonProblem(err error) string {
	switch e := err.(type) {
	case *json.SyntaxError:
		return fmt.Sprintf("invalid JSON at byte %d (%s)", e.Offset, e.Error())
	case *json.UnmarshalTypeError:
		return fmt.Sprintf("expected %s, found a JSON %s", e.Type, e.Value)
	}
	msg := err.Error()
	if msg == "EOF" {
		return "the body is empty"
	}
	if strings.Contains(msg, "unexpected EOF") {
		return "the JSON ends too early"
	}
	return msg
}

func isNull(raw json.RawMessage) bool { return bytes.Equal(bytes.TrimSpace(raw), []byte("null")) }

func firstByte(raw json.RawMessage) byte {
	b := bytes.TrimSpace(raw)
	if len(b) == 0 {
		return 0
	}
	return b[0]
}

func truncate(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n]) + "…"
}

func modelList(cfg *config.Config) string {
	var parts []string
	for _, g := range cfg.ModelGroups {
		parts = append(parts, strings.Join(g.Models, ", "))
	}
	return strings.Join(parts, "; ")
}

func exampleModel(cfg *config.Config) string {
	if len(cfg.ModelGroups) > 0 && len(cfg.ModelGroups[0].Models) > 0 {
		return strings.ReplaceAll(cfg.ModelGroups[0].Models[0], "*", "4-6")
	}
	return "claude-sonnet-4-6"
}
