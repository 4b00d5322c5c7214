package api

import (
	"encoding/json"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"

	"github.com/sluice-dev/sluice/config"
)

// FuzzParseCreate: whatever the body, parsing a job either refuses it with a
// 4xx *Error carrying a readable message, or yields a request that is valid
// by every rule. The seed corpus runs with the normal tests;
// `go test -fuzz FuzzParseCreate ./api/` explores further.
func FuzzParseCreate(f *testing.F) {
	for _, seed := range []string{
		`{"user_id":"alice","request":{"model":"claude-sonnet-4-6","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}}`,
		`{"request":{"model":"claude-sonnet-4-6","metadata":{"user_id":"bob"},"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}}`,
		`{"user_id":"a","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}],"stream":false,"system":"be brief"},"deadline_seconds":30,"metadata":{"k":"v"}}`,
		`{"user_id":"u","request":{"model":"claude-sonnet-4-6","max_tokens":9223372036854775808,"messages":[]}}`,
		`{"user_id":"u\u0000","request":{}}`,
		"{\"user_id\":\"\xff\",\"request\":{}}",
		`[[[[[[[[[[]]]]]]]]]]`,
		`{"user_id":"u","deadline_seconds":-1,"request":{"model":"x"}}`,
		`{"user_id":"u","request":{"model":"claude-sonnet-4-6","max_tokens":1e400,"messages":[{"role":"user","content":"x"}]}}`,
		`{"user_id":"jose\u0301","request":{"model":"claude-sonnet-4-6","metadata":{"user_id":"jos\u00e9"},"messages":[{"role":"user","content":"x"}]}}`,
		`{"user_id":"\ud83d\udc69\u200d\ud83c\udf93\u00a0\u3000\u200e","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}]}}`,
		`{"user_id":"a\u2028b","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}]}}`,
		`{"request":{"user_id":"u","model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x"}]}}`,
		`null`, ``, `{}`, `{"user_id":"u","request":{"model":"claude-sonnet-4-6","messages":[{"role":"assistant","content":""}]}}`,
	} {
		f.Add([]byte(seed))
	}
	cfg := &config.Config{ModelGroups: []config.ModelGroup{{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 50, InputTPM: 30000, OutputTPM: 8000}}}
	tenant := &config.Tenant{Name: "t", DefaultMaxTokens: 1024, MaxMessages: 100, MaxTokensCap: 4096, MaxTokensPolicy: "clamp"}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := parseCreate(body, cfg, tenant)
		if err != nil {
			e, ok := err.(*Error)
			if !ok || e.Status < 400 || e.Status >= 500 || len(e.Message) < 10 || !utf8.ValidString(e.Message) {
				t.Fatalf("refusal %#v is not a readable 4xx", err)
			}
			return
		}
		if n := utf8.RuneCountInString(req.UserID); n < 1 || n > maxUserIDLen {
			t.Fatalf("accepted user_id of %d characters", n)
		}
		for _, r := range req.UserID {
			if !unicode.In(r, unicode.L, unicode.M, unicode.N, unicode.P, unicode.S, unicode.Zs, unicode.Cf) {
				t.Fatalf("accepted user_id %q holding %U", req.UserID, r)
			}
		}
		if !norm.NFC.IsNormalString(req.UserID) {
			t.Fatalf("accepted user_id %q is not in NFC", req.UserID)
		}
		if req.MaxTokens < 1 || req.MaxTokens > tenant.MaxTokensCap || req.Group == nil {
			t.Fatalf("accepted max_tokens %d (group %v)", req.MaxTokens, req.Group)
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(req.Request, &m); err != nil {
			t.Fatalf("accepted request is not a JSON object: %v", err)
		}
		if _, ok := m["stream"]; ok {
			t.Fatal("stream kept in the upstream request")
		}
		if _, ok := m["metadata"]; ok {
			t.Fatal("the user's metadata kept in the upstream request")
		}
		if !strings.HasPrefix(req.Model, "claude-sonnet-") {
			t.Fatalf("accepted model %q", req.Model)
		}
	})
}
