package api_test

import (
	"encoding/json"
	"math"
	"net/http"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

// A job's answer is costed at its model's price (the shipped list prices
// claude-sonnet-4-6 at $3 in, $15 out per million tokens), on the job and
// in the usage statistics; a configured price wins.
func TestJobCostInDollars(t *testing.T) {
	for _, tc := range []struct {
		name    string
		extra   string
		in, out float64
	}{
		{"shipped", "", 3, 15},
		{"configured", "usage:\n  prices:\n    - models: [\"claude-sonnet-4-6\"]\n      input: 2\n      output: 10\n", 2, 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := harness.Start(t, harness.Options{ExtraConfig: tc.extra})
			v := e.Submit(t, harness.JobBody("alice", "What is a token bucket? [[reply_tokens=40]]"))
			got := e.WaitTerminal(t, v.ID, 20*time.Second)
			if got.Status != jobs.Succeeded || got.Usage == nil {
				t.Fatalf("job: %+v", got)
			}
			want := math.Round(tc.in*float64(got.Usage.InputTokens)+tc.out*float64(got.Usage.OutputTokens)) / 1e6
			if got.CostUSD == nil || *got.CostUSD != want {
				t.Fatalf("cost_usd %v, want %v (usage %+v)", got.CostUSD, want, *got.Usage)
			}
			resp, body := e.Do(t, http.MethodGet, "/v1/admin/usage?granularity=hour&n=1", harness.AdminKey, nil)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("usage: %d %s", resp.StatusCode, body)
			}
			var rep struct {
				Totals struct {
					CostUSD float64 `json:"cost_usd"`
				}
				Tenants []struct {
					TopUsers []struct {
						UserID  string  `json:"user_id"`
						CostUSD float64 `json:"cost_usd"`
					} `json:"top_users"`
				}
			}
			if err := json.Unmarshal(body, &rep); err != nil {
				t.Fatal(err)
			}
			if rep.Totals.CostUSD != want || len(rep.Tenants) == 0 || len(rep.Tenants[0].TopUsers) == 0 || rep.Tenants[0].TopUsers[0].CostUSD != want {
				t.Fatalf("usage statistics' cost: %s", body)
			}
		})
	}
}
