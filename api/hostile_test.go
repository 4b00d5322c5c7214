package api_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/internal/harness"
)

// Hostile input: each is a 4xx with a clear message, never a 5xx or a crash.
func TestHostileInput(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, ExtraConfig: ""})
	// The harness api accepts 64 KiB bodies; this test needs the default 8 MiB.
	e.Config.API.BodyLimitBytes = 8 << 20

	manyMessages := func(n int) string {
		var b strings.Builder
		b.WriteString(`{"user_id":"u","request":{"model":"claude-sonnet-4-6","max_tokens":10,"messages":[`)
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			if i%2 == 0 {
				b.WriteString(`{"role":"user","content":"x"}`)
			} else {
				b.WriteString(`{"role":"assistant","content":"x"}`)
			}
		}
		b.WriteString(`]}}`)
		return b.String()
	}
	nested := strings.Repeat(`{"a":`, 100000) + "1" + strings.Repeat("}", 100000)
	tests := []struct {
		name   string
		body   string
		status int
		field  string
		says   string
	}{
		{"10 MB body", `{"user_id":"u","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"` + strings.Repeat("a", 10<<20) + `"}]}}`, 413, "", "8 MiB"},
		{"100,000 messages", manyMessages(100000), 400, "request.messages", "at most 1000"},
		{"deeply nested JSON", nested, 400, "", "JSON"},
		{"nested inside request", `{"user_id":"u","request":` + nested + `}`, 400, "", ""},
		{"invalid UTF-8", "{\"user_id\":\"u\xc3\x28\",\"request\":{}}", 400, "", "UTF-8"},
		{"max_tokens 2^63", `{"user_id":"u","request":{"model":"claude-sonnet-4-6","max_tokens":9223372036854775808,"messages":[{"role":"user","content":"x"}]}}`, 400, "request.max_tokens", "whole number"},
		{"max_tokens 1e400", `{"user_id":"u","request":{"model":"claude-sonnet-4-6","max_tokens":1e400,"messages":[{"role":"user","content":"x"}]}}`, 400, "request.max_tokens", "whole number"},
		{"negative deadline", `{"user_id":"u","deadline_seconds":-5,"request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}]}}`, 400, "deadline_seconds", "greater than 0"},
		{"user_id of 10,000 characters", `{"user_id":"` + strings.Repeat("u", 10000) + `","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}]}}`, 400, "user_id", "256"},
		{"user_id with a newline", `{"user_id":"a\nb","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}]}}`, 400, "user_id", "control"},
		{"user_id with NUL", `{"user_id":"a\u0000b","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}]}}`, 400, "user_id", "control"},
		{"unknown field", `{"user_id":"u","priority":"high","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}]}}`, 400, "priority", "Unknown field"},
		{"duplicate-looking trailing data", `{"user_id":"u","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}]}} {"x":1}`, 400, "", ""},
		{"user_id a number", `{"user_id":42,"request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}]}}`, 400, "user_id", "string"},
		{"messages an object", `{"user_id":"u","request":{"model":"claude-sonnet-4-6","messages":{"role":"user"}}}`, 400, "request.messages", "array"},
		{"content a number", `{"user_id":"u","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":5}]}}`, 400, "request.messages[0].content", ""},
		{"model an array", `{"user_id":"u","request":{"model":["claude-sonnet-4-6"],"messages":[{"role":"user","content":"x"}]}}`, 400, "request.model", ""},
		{"null request", `{"user_id":"u","request":null}`, 400, "request", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, []byte(tc.body))
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, truncate(b))
			}
			var eb errBody
			if err := json.Unmarshal(b, &eb); err != nil {
				t.Fatalf("error body not JSON: %s", truncate(b))
			}
			if eb.Error.Field != tc.field || !strings.Contains(eb.Error.Message, tc.says) || len(eb.Error.Message) < 20 {
				t.Fatalf("error %+v; want field %q and a message saying %q", eb.Error, tc.field, tc.says)
			}
			if len(b) > 2048 {
				t.Fatalf("error body echoes the input (%d bytes)", len(b))
			}
		})
	}
}

func truncate(b []byte) string {
	if len(b) > 300 {
		return string(b[:300]) + "…"
	}
	return string(bytes.ToValidUTF8(b, []byte("?")))
}
