package api_test

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/usage"
)

// metric reads one series' value from a Prometheus text page (-1 when absent).
func metric(page, series string) float64 {
	if v, ok := harness.Metric(page, series); ok {
		return v
	}
	return -1
}

func scrape(t *testing.T, e *harness.Env) string {
	t.Helper()
	resp, b := e.Do(t, http.MethodGet, "/metrics", "", nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %d %s", resp.StatusCode, b)
	}
	return string(b)
}

// TestUsageAndMetricsFollowTheJobs runs jobs for two users, one refused
// over its quota, and checks that /metrics moved and that the usage
// statistics equal the sum of the jobs' own usage.
func TestUsageAndMetricsFollowTheJobs(t *testing.T) {
	e := harness.Start(t, harness.Options{TenantExtra: "    requests_per_hour: 3\n"})
	before := scrape(t, e)
	if v := metric(before, `sluice_admissions_total{group="sonnet",outcome="admitted"}`); v > 0 {
		t.Fatalf("admissions before any job: %v", v)
	}

	var ids []string
	users := []string{"ann", "ann", "ann", "bob", "bob"}
	for i, u := range users {
		v := e.Submit(t, harness.JobBody(u, strings.Repeat("tell me more ", i+1)))
		ids = append(ids, v.ID)
	}
	resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("ann", "a fourth one"))
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("ann's fourth job within the hour: %d %s", resp.StatusCode, b)
	}
	want := map[string]jobs.Usage{}
	var total jobs.Usage
	var input, output int
	for _, id := range ids {
		v := e.WaitTerminal(t, id, 20*time.Second)
		if v.Status != jobs.Succeeded || v.Usage == nil {
			t.Fatalf("job %s: %s", id, v.Status)
		}
		u := want[v.UserID]
		u.InputTokens += v.Usage.InputTokens
		u.OutputTokens += v.Usage.OutputTokens
		u.CacheReadInputTokens += v.Usage.CacheReadInputTokens
		u.CacheCreationInputTokens += v.Usage.CacheCreationInputTokens
		want[v.UserID] = u
		total.InputTokens += v.Usage.InputTokens
		total.OutputTokens += v.Usage.OutputTokens
		input += v.Usage.InputTokens
		output += v.Usage.OutputTokens
	}

	// Metrics moved. (The worker counts a job's tokens after its record
	// says succeeded: wait for the count, not a fixed time.)
	var page string
	harness.Eventually(t, 10*time.Second, func() bool {
		page = scrape(t, e)
		return metric(page, `sluice_jobs_finished_total{group="sonnet",status="succeeded"}`) == 5
	}, "five jobs counted as finished in /metrics")
	checks := map[string]float64{
		`sluice_admissions_total{group="sonnet",outcome="admitted"}`:             5,
		`sluice_admissions_total{group="sonnet",outcome="user_quota"}`:           1,
		`sluice_upstream_responses_total{group="sonnet",status="200"}`:           5,
		`sluice_tokens_total{group="sonnet",kind="input"}`:                       float64(input),
		`sluice_tokens_total{group="sonnet",kind="output"}`:                      float64(output),
		`sluice_upstream_duration_seconds_count{group="sonnet",status="200"}`:    5,
		`sluice_upstream_first_token_seconds_count{group="sonnet",status="200"}`: 5,
		`sluice_queue_wait_seconds_count{group="sonnet"}`:                        5,
		`sluice_input_estimate_ratio_count{group="sonnet"}`:                      5,
		`sluice_upstream_in_flight{group="sonnet"}`:                              0,
		`sluice_queue_jobs{group="sonnet"}`:                                      0,
		`sluice_queue_active_users{group="sonnet"}`:                              0,
		`sluice_limit_per_minute{dimension="requests",group="sonnet"}`:           6000,
	}
	for series, v := range checks {
		if got := metric(page, series); got != v {
			t.Errorf("%s = %v, want %v", series, got, v)
		}
	}
	for _, series := range []string{
		`sluice_limiter_headroom_ratio{dimension="input_tokens",group="sonnet",source="sluice"}`,
		`sluice_limiter_headroom_ratio{dimension="output_tokens",group="sonnet",source="upstream"}`,
		`sluice_dispatched_total{group="sonnet"}`,
	} {
		if metric(page, series) < 0 {
			t.Errorf("%s missing from /metrics", series)
		}
	}
	// What went out in the last minute: 5 requests, and their tokens as
	// the upstream counted them (a minute boundary inside the test can
	// only weigh the previous minute a little less).
	if v := metric(page, `sluice_used_last_minute{dimension="requests",group="sonnet"}`); v < 4 || v > 5 {
		t.Errorf("requests used in the last minute: %v, want 5", v)
	}
	if v := metric(page, `sluice_used_last_minute{dimension="output_tokens",group="sonnet"}`); v < float64(output)*0.8 || v > float64(output) {
		t.Errorf("output tokens used in the last minute: %v, want %d", v, output)
	}
	if strings.Contains(page, `"ann"`) || strings.Contains(page, "user_id") || strings.Contains(page, harness.TenantKey) {
		t.Error("/metrics names a user or a key")
	}

	// Usage statistics equal the jobs' own usage.
	resp, b = e.Do(t, http.MethodGet, "/v1/admin/usage?hours=24", harness.AdminKey, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("usage: %d %s", resp.StatusCode, b)
	}
	var rep usage.Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Buckets) != 24 || rep.Granularity != usage.Hour {
		t.Fatalf("%d %s buckets", len(rep.Buckets), rep.Granularity)
	}
	acme := rep.Tenants[0]
	if acme.Tenant != "acme" || rep.Tenants[1].Tenant != "other" {
		t.Fatalf("tenants %+v", rep.Tenants)
	}
	got := acme.Totals
	if got.Requests != 5 || got.InputTokens != int64(total.InputTokens) || got.OutputTokens != int64(total.OutputTokens) {
		t.Errorf("statistics: %d requests, %d in, %d out; the jobs: 5, %d, %d", got.Requests, got.InputTokens, got.OutputTokens, total.InputTokens, total.OutputTokens)
	}
	if got.Refused.UserQuota != 1 || got.Refused.QueueLimit != 0 {
		t.Errorf("refusals %+v, want one for the user quota", got.Refused)
	}
	if got.Latency.P50 == nil || got.Latency.P95 == nil || *got.Latency.P95 < *got.Latency.P50 {
		t.Errorf("latency percentiles %+v", got.Latency)
	}
	if rep.Totals.Requests != 5 || rep.Tenants[1].Totals.Requests != 0 {
		t.Errorf("all tenants %d requests, other %d", rep.Totals.Requests, rep.Tenants[1].Totals.Requests)
	}
	if len(acme.TopUsers) != 2 {
		t.Fatalf("top users %+v", acme.TopUsers)
	}
	for _, u := range acme.TopUsers {
		w := want[u.UserID]
		if u.Tokens != int64(w.InputTokens+w.OutputTokens+w.CacheReadInputTokens+w.CacheCreationInputTokens) {
			t.Errorf("user %s: %d tokens, the jobs %+v", u.UserID, u.Tokens, w)
		}
	}
	if acme.TopUsers[0].Tokens < acme.TopUsers[1].Tokens {
		t.Errorf("top users not largest first: %+v", acme.TopUsers)
	}

	// The same as CSV, one row per tenant per hour.
	resp, b = e.Do(t, http.MethodGet, "/v1/admin/usage?hours=3&format=csv&tenant=acme", harness.AdminKey, nil)
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/csv") {
		t.Fatalf("csv: %d %s %s", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	rows, err := csv.NewReader(bytes.NewReader(b)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 4 || rows[0][0] != "start" {
		t.Fatalf("csv rows: %v", rows)
	}
	var n int
	for _, r := range rows[1:] {
		k, _ := strconv.Atoi(r[2])
		n += k
	}
	if n != 5 {
		t.Errorf("csv adds up to %d requests", n)
	}
}

// TestAdminStatusCountsWaitingUsers: the live state counts queued jobs and
// the users they belong to, and follows cancels.
func TestAdminStatusCountsWaitingUsers(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	a1 := e.Submit(t, harness.JobBody("ann", "one"))
	e.Submit(t, harness.JobBody("ann", "two"))
	b1 := e.Submit(t, harness.JobBody("bob", "three"))

	type status struct {
		Groups []struct {
			Group       string `json:"group"`
			Queued      int    `json:"queued"`
			ActiveUsers int    `json:"active_users"`
			Limits      []struct {
				Dimension string  `json:"dimension"`
				PerMinute float64 `json:"per_minute"`
				InUse     float64 `json:"in_use"`
			} `json:"limits"`
		} `json:"groups"`
	}
	read := func() status {
		resp, b := e.Do(t, http.MethodGet, "/v1/admin/status", harness.AdminKey, nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status: %d %s", resp.StatusCode, b)
		}
		var s status
		if err := json.Unmarshal(b, &s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	s := read()
	if g := s.Groups[0]; g.Group != "sonnet" || g.Queued != 3 || g.ActiveUsers != 2 || len(g.Limits) != 3 || g.Limits[0].PerMinute != 6000 {
		t.Fatalf("status %+v", s)
	}
	page := scrape(t, e)
	if metric(page, `sluice_queue_jobs{group="sonnet"}`) != 3 || metric(page, `sluice_queue_active_users{group="sonnet"}`) != 2 {
		t.Errorf("metrics: queue %v users %v", metric(page, `sluice_queue_jobs{group="sonnet"}`), metric(page, `sluice_queue_active_users{group="sonnet"}`))
	}
	for _, id := range []string{a1.ID, b1.ID} {
		if resp, b := e.Do(t, http.MethodDelete, "/v1/jobs/"+id, harness.TenantKey, nil); resp.StatusCode != http.StatusOK {
			t.Fatalf("cancel: %d %s", resp.StatusCode, b)
		}
	}
	if g := read().Groups[0]; g.Queued != 1 || g.ActiveUsers != 1 {
		t.Errorf("after canceling one of ann's and bob's only job: %+v, want 1 queued, 1 user", g)
	}
	page = scrape(t, e)
	if v := metric(page, `sluice_jobs_finished_total{group="sonnet",status="canceled"}`); v != 2 {
		t.Errorf("canceled jobs counted %v", v)
	}
}

func TestAdminRoutesNeedTheAdminKey(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	for _, path := range []string{"/dashboard", "/dashboard/dashboard.js", "/v1/admin/usage", "/v1/admin/status"} {
		for _, key := range []string{"", harness.TenantKey, "not-a-key"} {
			resp, b := e.Do(t, http.MethodGet, path, key, nil)
			if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(string(b), "authentication_error") {
				t.Errorf("%s with key %q: %d %s", path, key, resp.StatusCode, b)
			}
			if resp.Header.Get("WWW-Authenticate") == "" {
				t.Errorf("%s: no WWW-Authenticate, so a browser would not ask for the key", path)
			}
		}
	}
	resp, b := e.Do(t, http.MethodGet, "/dashboard", harness.AdminKey, nil)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "sluice · operations") {
		t.Fatalf("dashboard with the admin key: %d", resp.StatusCode)
	}
	// A browser sends the key as the basic-auth password.
	req, _ := http.NewRequest(http.MethodGet, e.API.URL+"/dashboard/dashboard.js", nil)
	req.SetBasicAuth("ops", harness.AdminKey)
	r2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r2.Body.Close()
	if r2.StatusCode != http.StatusOK || !strings.Contains(r2.Header.Get("Content-Type"), "javascript") {
		t.Errorf("dashboard script by basic auth: %d %s", r2.StatusCode, r2.Header.Get("Content-Type"))
	}
	for _, p := range []string{"/dashboard/../static/index.html", "/dashboard/nope.js"} {
		if resp, _ := e.Do(t, http.MethodGet, p, harness.AdminKey, nil); resp.StatusCode != http.StatusNotFound {
			t.Errorf("%s: %d, want 404", p, resp.StatusCode)
		}
	}
	// The page's files are not served without the key elsewhere either.
	if resp, b := e.Do(t, http.MethodGet, "/dashboard.js", "", nil); resp.StatusCode == http.StatusOK {
		t.Errorf("/dashboard.js served openly: %s", b[:min(len(b), 80)])
	}
}

func TestMetricsCanRequireTheAdminKey(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, ExtraConfig: "metrics: {require_admin_key: true}\n"})
	if resp, _ := e.Do(t, http.MethodGet, "/metrics", "", nil); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("/metrics without the key: %d, want 401", resp.StatusCode)
	}
	if resp, _ := e.Do(t, http.MethodGet, "/metrics", harness.AdminKey, nil); resp.StatusCode != http.StatusOK {
		t.Errorf("/metrics with the key: %d", resp.StatusCode)
	}
}

func TestAdminUsageBadInput(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	for _, tc := range []struct {
		query  string
		status int
		field  string
		says   string
	}{
		{"hours=0", 400, "hours", "from 1 to 168"},
		{"hours=abc", 400, "hours", "whole number"},
		{"hours=169", 400, "hours", "use days= for longer"},
		{"hours=2.5", 400, "hours", "whole number"},
		{"days=0", 400, "days", "from 1 to 400"},
		{"days=401", 400, "days", "kept 400 days"},
		{"hours=2&days=2", 400, "days", "not both"},
		{"top=-1", 400, "top", "0 to 100"},
		{"top=101", 400, "top", "0 to 100"},
		{"format=xml", 400, "format", "format must be"},
		{"tenant=nobody", 404, "", "no tenant named"},
	} {
		resp, b := e.Do(t, http.MethodGet, "/v1/admin/usage?"+tc.query, harness.AdminKey, nil)
		if resp.StatusCode != tc.status || !strings.Contains(string(b), tc.says) {
			t.Errorf("%s: %d %s; want %d saying %q", tc.query, resp.StatusCode, b, tc.status, tc.says)
			continue
		}
		if tc.field != "" && !regexp.MustCompile(`"(param|field)":"`+tc.field+`"`).Match(b) {
			t.Errorf("%s: the error does not name %q: %s", tc.query, tc.field, b)
		}
	}
	resp, b := e.Do(t, http.MethodGet, "/v1/admin/usage?days=7&tenant=other&top=0", harness.AdminKey, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("days=7: %d %s", resp.StatusCode, b)
	}
	var rep usage.Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Granularity != usage.Day || len(rep.Buckets) != 7 || len(rep.Tenants) != 1 || rep.Tenants[0].Tenant != "other" {
		t.Errorf("days=7 for other: %s, %d buckets, tenants %+v", rep.Granularity, len(rep.Buckets), rep.Tenants)
	}
}
