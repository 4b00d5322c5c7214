package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/labstack/echo/v5"

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
	Class           string          // the service class (config.ClassInteractive, ClassBackground)
	// NoFallback: the request turned model fallback off (fallback: false).
	// FallbackOrder, when not nil, is the request's own order of
	// fallbacks, used instead of the tenant's rule's.
	NoFallback    bool
	FallbackOrder []fallbackTarget
}

// fallbackTarget is a model group a request may fall back to, and the
// model its job then runs on.
type fallbackTarget struct {
	Group *config.ModelGroup
	Model string
}

const (
	maxUserIDLen = config.MaxUserIDLength
	// maxMetadataBytes bounds the client's own metadata kept with a job.
	maxMetadataBytes = 16 << 10
	// maxMaxTokens bounds max_tokens to what any current model could give.
	maxMaxTokens = 1_000_000
	// maxDeadline is the longest deadline_seconds a job may ask for (7 days).
	maxDeadline = 7 * 24 * 3600
)

var jobFields = map[string]bool{"user_id": true, "request": true, "deadline_seconds": true, "metadata": true, "class": true, "fallback": true}

// parseCreate validates a POST /v1/jobs body (and, wrapped as
// {"request": …}, a POST /v1/messages body). Every refusal names the field
// (as a JSON path) and says what would be accepted. The steps run in this
// order, so the first problem found is the one reported.
func parseCreate(body []byte, cfg *config.Config, tenant *config.Tenant) (*createRequest, error) {
	top, req, err := decodeJob(body)
	if err != nil {
		return nil, err
	}
	out := &createRequest{}
	if out.UserID, err = jobUser(top, req); err != nil {
		return nil, err
	}
	if out.Model, out.Group, err = jobModel(req, cfg); err != nil {
		return nil, err
	}
	if out.MaxTokens, err = jobMaxTokens(req, tenant); err != nil {
		return nil, err
	}
	contents, err := checkMessages(req["messages"], tenant.MaxMessages)
	if err != nil {
		return nil, err
	}
	out.RawInput = estimate.RawParts(req["system"], contents, req["tools"])
	if err := dropStream(req); err != nil {
		return nil, err
	}
	delete(req, "metadata") // the upstream gets an opaque user hash instead
	if out.DeadlineSeconds, err = jobDeadline(top); err != nil {
		return nil, err
	}
	if out.Metadata, err = jobMetadata(top); err != nil {
		return nil, err
	}
	if out.Class, err = jobClass(top); err != nil {
		return nil, err
	}
	if out.NoFallback, out.FallbackOrder, err = jobFallback(top["fallback"], cfg, out.Group); err != nil {
		return nil, err
	}
	if out.Request, err = json.Marshal(req); err != nil {
		return nil, invalid("request", "The request could not be re-encoded: %v.", err)
	}
	return out, nil
}

// decodeJob splits a job body into its top-level fields and the fields of
// its request (the Messages API body), refusing a body that is not UTF-8
// JSON, has an unknown top-level field, or has no request object.
func decodeJob(body []byte) (top, req map[string]json.RawMessage, err error) {
	if !utf8.Valid(body) {
		return nil, nil, invalid("", "The request body is not valid UTF-8 text. Send JSON encoded as UTF-8.")
	}
	if err := decodeStrict(body, &top); err != nil {
		return nil, nil, invalid("", "The request body is not a JSON object: %s.", jsonProblem(err))
	}
	if top == nil {
		return nil, nil, invalid("", "The request body must be a JSON object with user_id and request.")
	}
	for k := range top {
		if !jobFields[k] {
			return nil, nil, invalid(k, "Unknown field %q. A job takes user_id, request, class, deadline_seconds, metadata and fallback.", truncate(k, 64))
		}
	}
	rawReq, ok := top["request"]
	if !ok || isNull(rawReq) {
		return nil, nil, invalid("request", "The request field is missing: it holds the Messages API body (model, max_tokens, messages).")
	}
	if err := json.Unmarshal(rawReq, &req); err != nil || req == nil {
		return nil, nil, invalid("request", "The request field must be a JSON object (a Messages API body).")
	}
	return top, req, nil
}

// jobUser is the job's user (checked and normalised: userID): the
// top-level user_id or request.metadata.user_id; given in both, they must
// name the same user. A user_id inside request itself is in the wrong place
// (the Messages API has no such field) and is refused, saying where it goes.
func jobUser(top, req map[string]json.RawMessage) (string, error) {
	if raw, ok := req["user_id"]; ok && !isNull(raw) {
		// A Messages request reads this as "user_id is in the wrong place:
		// give the user id as metadata.user_id, …" (messagesError drops
		// "request."), which is right for it too.
		return "", invalid("request.user_id", "request.user_id is in the wrong place: give the user id as request.metadata.user_id, or (in a POST /v1/jobs body) as user_id at the top level, next to request.")
	}
	topUser, haveTop, err := userField(top, "user_id", "user_id")
	if err != nil {
		return "", err
	}
	var mdUser string
	var haveMD bool
	if raw, ok := req["metadata"]; ok && !isNull(raw) {
		var md map[string]json.RawMessage
		if err := json.Unmarshal(raw, &md); err != nil || md == nil {
			return "", invalid("request.metadata", "request.metadata must be a JSON object.")
		}
		if mdUser, haveMD, err = userField(md, "user_id", "request.metadata.user_id"); err != nil {
			return "", err
		}
	}
	switch {
	case haveTop && haveMD && topUser != mdUser:
		return "", invalid("user_id", "user_id and request.metadata.user_id are both given and differ; give one, or the same value in both.")
	case haveTop:
		return topUser, nil
	case haveMD:
		return mdUser, nil
	}
	return "", invalid("user_id", "user_id is missing: say which of your users this request is for (top-level user_id or request.metadata.user_id).")
}

// userField reads the user id m[key] (path names it in a refusal),
// checked and normalised (userID); ok is false when it is absent or null.
func userField(m map[string]json.RawMessage, key, path string) (u string, ok bool, err error) {
	raw, present := m[key]
	if !present || isNull(raw) {
		return "", false, nil
	}
	if err := json.Unmarshal(raw, &u); err != nil {
		return "", false, invalid(path, "%s must be a string.", path)
	}
	if u, err = userID(path, u); err != nil {
		return "", false, err
	}
	return u, true, nil
}

// jobModel is request.model and the model group that serves it.
func jobModel(req map[string]json.RawMessage, cfg *config.Config) (string, *config.ModelGroup, error) {
	rawModel, ok := req["model"]
	if !ok || isNull(rawModel) {
		return "", nil, invalid("request.model", "request.model is missing. Name a model such as %q.", exampleModel(cfg))
	}
	var model string
	if err := json.Unmarshal(rawModel, &model); err != nil || model == "" {
		return "", nil, invalid("request.model", "request.model must be a non-empty string naming a model.")
	}
	g, ok := cfg.GroupFor(model)
	if !ok {
		e := invalid("request.model", "The model %q is not served here. Models served: %s.", truncate(model, 100), modelList(cfg))
		e.Extra = map[string]any{"unknown_model": true}
		return "", nil, e
	}
	return model, g, nil
}

// jobMaxTokens is the job's max_tokens: request.max_tokens, or the
// tenant's default, within the tenant's cap (clamped to it, or refused
// above it, as the tenant's policy says). req is updated to the value used.
func jobMaxTokens(req map[string]json.RawMessage, tenant *config.Tenant) (int, error) {
	var n int
	if raw, ok := req["max_tokens"]; ok && !isNull(raw) {
		var err error
		if n, err = positiveInt(raw, maxMaxTokens); err != nil {
			return 0, invalid("request.max_tokens", "request.max_tokens must be a whole number from 1 to %d.", maxMaxTokens)
		}
	} else {
		n = tenant.DefaultMaxTokens
		req["max_tokens"] = json.RawMessage(fmt.Sprint(n))
	}
	if c := tenant.MaxTokensCap; c > 0 && n > c {
		if tenant.MaxTokensPolicy == "reject" {
			return 0, invalid("request.max_tokens", "request.max_tokens is %d; the most allowed here is %d. Ask for %d or less.", n, c, c)
		}
		n = c // clamp: the job shows the value used
		req["max_tokens"] = json.RawMessage(fmt.Sprint(c))
	}
	return n, nil
}

// dropStream removes request.stream: false, and refuses stream: true (the
// job API streams through /v1/jobs/{id}/events instead).
func dropStream(req map[string]json.RawMessage) error {
	raw, ok := req["stream"]
	if !ok {
		return nil
	}
	var b bool
	if err := json.Unmarshal(raw, &b); err != nil || b {
		return invalid("request.stream", "request.stream is not used here: follow GET /v1/jobs/{id}/events for live text, or use POST /v1/messages with stream: true.")
	}
	delete(req, "stream")
	return nil
}

// jobDeadline is deadline_seconds; 0 when none is given.
func jobDeadline(top map[string]json.RawMessage) (float64, error) {
	raw, ok := top["deadline_seconds"]
	if !ok || isNull(raw) {
		return 0, nil
	}
	var d float64
	if err := json.Unmarshal(raw, &d); err != nil || d <= 0 || d > maxDeadline || math.IsNaN(d) {
		return 0, invalid("deadline_seconds", "deadline_seconds must be a number of seconds greater than 0 and at most %d (7 days).", maxDeadline)
	}
	return d, nil
}

// jobMetadata is the client's own metadata, kept with the job as given;
// nil when none is given.
func jobMetadata(top map[string]json.RawMessage) (json.RawMessage, error) {
	raw, ok := top["metadata"]
	if !ok || isNull(raw) {
		return nil, nil
	}
	var md map[string]json.RawMessage
	if err := json.Unmarshal(raw, &md); err != nil || md == nil {
		return nil, invalid("metadata", "metadata must be a JSON object; it is kept with the job and returned as given.")
	}
	if len(raw) > maxMetadataBytes {
		return nil, invalid("metadata", "metadata is %d bytes; at most 16 KiB is kept with a job.", len(raw))
	}
	return raw, nil
}

// jobFallback reads the top-level fallback: absent, null or true, the
// tenant's rule applies (off false, order nil); false (or an empty list)
// turns fallback off; a list of model group or model names is the
// request's own order.
func jobFallback(raw json.RawMessage, cfg *config.Config, g *config.ModelGroup) (off bool, order []fallbackTarget, err error) {
	if raw == nil || isNull(raw) {
		return false, nil, nil
	}
	var b bool
	if json.Unmarshal(raw, &b) == nil {
		return !b, nil, nil
	}
	var names []string
	if err := json.Unmarshal(raw, &names); err != nil {
		return false, nil, invalid("fallback", "fallback must be true (the default: your tenant's fallback rule applies), false (no fallback), or a list of model groups or models to try in order, such as [%q].", exampleFallback(cfg, g))
	}
	order, err = fallbackOrder("fallback", names, cfg, g)
	return len(order) == 0, order, err
}

// fallbackOrder resolves a request's own fallback order (field names it
// in a refusal): each name a model group or a model served here, none in
// the group that serves the request, none twice.
func fallbackOrder(field string, names []string, cfg *config.Config, g *config.ModelGroup) ([]fallbackTarget, error) {
	if len(names) > len(cfg.ModelGroups) {
		return nil, invalid(field, "%s lists %d fallbacks, but there are only %d model groups; name each group (or one of its models) once.", field, len(names), len(cfg.ModelGroups))
	}
	order := make([]fallbackTarget, 0, len(names))
	for i, name := range names {
		fg, model, err := cfg.FallbackTarget(name)
		switch {
		case fg != nil && fg == g:
			return nil, invalid(field, "%s[%d] is %q, which is served by the model group %q that the request's own model is in; a fallback must be another group.", field, i, truncate(name, 100), g.Name)
		case errors.Is(err, config.ErrPatternsOnly):
			return nil, invalid(field, "%s[%d] is the model group %q, which serves models by pattern only (%s); name the model to use instead.", field, i, truncate(name, 100), strings.Join(fg.Models, ", "))
		case err != nil:
			return nil, invalid(field, "%s[%d] is %q, which is neither a model group nor a model served here. Model groups: %s. Models served: %s.", field, i, truncate(name, 100), strings.Join(cfg.GroupNames(), ", "), modelList(cfg))
		}
		for _, prev := range order {
			if prev.Group == fg {
				return nil, invalid(field, "%s names the model group %q twice; each group is tried once.", field, fg.Name)
			}
		}
		order = append(order, fallbackTarget{Group: fg, Model: model})
	}
	return order, nil
}

// exampleFallback names a model group other than g, for a refusal's
// example.
func exampleFallback(cfg *config.Config, g *config.ModelGroup) string {
	for _, o := range cfg.ModelGroups {
		if g == nil || o.Name != g.Name {
			return o.Name
		}
	}
	return "haiku"
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
		c, err := checkMessage(fmt.Sprintf("request.messages[%d]", i), m, i == len(msgs)-1)
		if err != nil {
			return nil, err
		}
		contents[i] = c
	}
	return contents, nil
}

// checkMessage validates one message (path is its JSON path; last: it is
// the conversation's last) and returns its content.
func checkMessage(path string, m map[string]json.RawMessage, last bool) (json.RawMessage, error) {
	if m == nil {
		return nil, invalid(path, "%s must be an object with role and content.", path)
	}
	var role string
	if err := json.Unmarshal(m["role"], &role); err != nil || (role != "user" && role != "assistant") {
		return nil, invalid(path+".role", "%s.role must be \"user\" or \"assistant\".", path)
	}
	c, ok := m["content"]
	if !ok || isNull(c) {
		return nil, invalid(path+".content", "%s.content is missing: give a string or an array of content blocks.", path)
	}
	switch firstByte(c) {
	case '"':
		var s string
		if err := json.Unmarshal(c, &s); err != nil {
			return nil, invalid(path+".content", "%s.content is not a valid string.", path)
		}
		if s == "" && last && role == "user" {
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
	return c, nil
}

// userID checks a user id given in field (a JSON path, or the name of a
// query or path parameter) and returns its canonical form: the rule is
// config.NormalizeUserID's (valid UTF-8; letters, marks, numbers,
// punctuation, symbols, space separators and format characters, not control
// characters or U+2028/U+2029; normalised to NFC; 1 to 256 characters).
// Every user id that enters the api goes through it before it is used.
func userID(field, u string) (string, error) {
	n, err := config.NormalizeUserID(u)
	if err == nil {
		return n, nil
	}
	e, _ := err.(*config.UserIDError)
	if e == nil {
		return "", invalid(field, "%s %v.", field, err)
	}
	switch e.Problem {
	case config.UserIDEmpty:
		return "", invalid(field, "%s is empty: give the id of your end user (1 to %d characters).", field, maxUserIDLen)
	case config.UserIDInvalidUTF8:
		return "", invalid(field, "%s is not valid UTF-8 text: send the id of your end user as UTF-8 (percent-encoded in a URL).", field)
	case config.UserIDBadChar:
		return "", invalid(field, "%s contains %s at character %d. A user id may hold letters, digits, punctuation, symbols, spaces and emoji, but not control characters or line breaks.", field, config.DescribeChar(e.Char), e.At)
	case config.UserIDTooLong:
		return "", invalid(field, "%s is %d characters long; the limit is %d.", field, e.Length, maxUserIDLen)
	}
	return "", invalid(field, "%s %v.", field, err)
}

// pathParam is the path parameter name, percent-decoded exactly once.
// Echo's router matches the path as it was sent (URL.RawPath) when that
// differs from the decoded URL.Path, as it does when the path holds %2F,
// and then leaves parameters encoded; otherwise it matches URL.Path and
// they come decoded. Every path parameter goes through here, so that
// /v1/users/a%2Fb/usage names the user "a/b" as a body's "a/b" does.
func pathParam(c *echo.Context, name string) (string, error) {
	v := c.Param(name)
	if c.Request().URL.RawPath == "" {
		return v, nil
	}
	d, err := url.PathUnescape(v)
	if err != nil {
		return "", invalid(name, "The %s in the path is not correctly percent-encoded.", name)
	}
	return d, nil
}

// pathUserID is the {user_id} of the path, decoded and checked (userID).
func pathUserID(c *echo.Context) (string, error) {
	u, err := pathParam(c, "user_id")
	if err != nil {
		return "", err
	}
	return userID("user_id", u)
}

func positiveInt(raw json.RawMessage, max int) (int, error) {
	var i int64
	var err error
	if digits(raw) {
		// The common case, without a decoder: a plain JSON number (no
		// leading zero, which JSON does not allow).
		i, err = strconv.ParseInt(string(raw), 10, 64)
	} else {
		var n json.Number
		if err = json.Unmarshal(raw, &n); err == nil {
			i, err = n.Int64()
		}
	}
	if err != nil {
		return 0, err
	}
	if i < 1 || i > int64(max) {
		return 0, fmt.Errorf("out of range")
	}
	return int(i), nil
}

// digits reports whether b is a whole JSON number of digits alone.
func digits(b []byte) bool {
	if len(b) == 0 || len(b) > 18 || (b[0] == '0' && len(b) > 1) {
		return false
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// decodeStrict decodes exactly one JSON value with nothing after it.
func decodeStrict(b []byte, v any) error {
	// json.Unmarshal refuses anything after the value too, without a
	// decoder's copy of the body; a decoder tells why.
	if json.Unmarshal(b, v) == nil {
		return nil
	}
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(v); err != nil {
		return err
	}
	return fmt.Errorf("unexpected data after the JSON value")
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
