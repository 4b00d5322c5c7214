package api_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/internal/harness"
)

// A request whose cache_control markers the upstream would refuse is
// refused at admission, saying which marker and why; nothing is queued.
func TestBadCacheControlIsRefusedAtAdmission(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	block := func(cc any) map[string]any {
		return map[string]any{"type": "text", "text": "some context", "cache_control": cc}
	}
	eph := map[string]string{"type": "ephemeral"}
	for _, tc := range []struct {
		name   string
		system []map[string]any
		want   string
	}{
		{"five breakpoints", []map[string]any{block(eph), block(eph), block(eph), block(eph), block(eph)}, "at most 4"},
		{"unknown ttl", []map[string]any{block(map[string]string{"type": "ephemeral", "ttl": "10m"})}, `system[0]: cache_control ttl must be "5m" or "1h"`},
		{"unknown type", []map[string]any{block(map[string]string{"type": "persistent"})}, `system[0]: cache_control type must be "ephemeral"`},
		{"not an object", []map[string]any{block("ephemeral")}, "system[0]: cache_control must be an object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := map[string]any{"user_id": "alice", "request": map[string]any{
				"model": harness.Model, "max_tokens": 10, "system": tc.system,
				"messages": []map[string]any{{"role": "user", "content": "hi"}}}}
			resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
			var got struct {
				Error struct {
					Type, Message, Field string
				}
			}
			if resp.StatusCode != http.StatusBadRequest || json.Unmarshal(b, &got) != nil {
				t.Fatalf("%d %s", resp.StatusCode, b)
			}
			if got.Error.Type != "invalid_request" || got.Error.Field != "request" || !strings.Contains(got.Error.Message, tc.want) {
				t.Fatalf("error %+v, want a message with %q", got.Error, tc.want)
			}
		})
	}
	if n, err := e.Sched.QueueLength(t.Context(), "sonnet"); err != nil || n != 0 {
		t.Fatalf("queued %d (%v), want none", n, err)
	}
}
