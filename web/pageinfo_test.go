package web_test

import (
	"encoding/json"
	"net/http"
	"testing"

	"github.com/sluice-dev/sluice/internal/harness"
)

// TestPageInfo: GET /v1/page-info needs no key and tells the chat page
// whether the answers come from sluice's own fake upstream, and nothing
// else.
func TestPageInfo(t *testing.T) {
	pageInfo := func(e *harness.Env) map[string]any {
		t.Helper()
		resp, b := e.Do(t, http.MethodGet, "/v1/page-info", "", nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("page-info: %d %s", resp.StatusCode, b)
		}
		var out map[string]any
		must(t, json.Unmarshal(b, &out))
		return out
	}

	fake := harness.Start(t, harness.Options{NoWorker: true})
	if got := pageInfo(fake); len(got) != 1 || got["fake_upstream"] != true {
		t.Errorf("with the fake upstream: %v, want only fake_upstream: true", got)
	}

	real := harness.Start(t, harness.Options{NoWorker: true, RealUpstream: true})
	if got := pageInfo(real); got["fake_upstream"] != false {
		t.Errorf("with a real upstream: %v, want fake_upstream: false", got)
	}
}
