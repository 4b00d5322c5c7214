package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

type errBody struct {
	Error struct {
		Type              string  `json:"type"`
		Message           string  `json:"message"`
		Field             string  `json:"field"`
		ResetAt           string  `json:"reset_at"`
		RetryAfterSeconds float64 `json:"retry_after_seconds"`
	} `json:"error"`
}

func decodeErr(t *testing.T, b []byte) errBody {
	t.Helper()
	var e errBody
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("not an error body: %s", b)
	}
	return e
}

func TestRequestQuotaRefusalSaysWhenExactly(t *testing.T) {
	clk := harness.NewClock(time.Date(2026, 11, 29, 14, 0, 0, 0, time.UTC))
	e := harness.Start(t, harness.Options{NoWorker: true, Clock: clk.Now, TenantExtra: "    requests_per_hour: 20\n"})
	for i := range 20 {
		resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("alice", "hi"))
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("request %d: %d %s", i+1, resp.StatusCode, b)
		}
		if got := resp.Header.Get("RateLimit-Remaining"); got != strconv.Itoa(19-i) {
			t.Fatalf("request %d: RateLimit-Remaining %q", i+1, got)
		}
		if resp.Header.Get("RateLimit-Limit") != "20" || resp.Header.Get("RateLimit-Reset") == "" {
			t.Fatalf("RateLimit headers: %v", resp.Header)
		}
	}
	resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("alice", "hi"))
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("21st: %d %s", resp.StatusCode, b)
	}
	eb := decodeErr(t, b)
	if eb.Error.Type != "rate_limit" || eb.Error.RetryAfterSeconds != 180 || eb.Error.ResetAt != "2026-11-29T14:03:00Z" {
		t.Fatalf("refusal = %+v", eb.Error)
	}
	if want := "You've used your 20 requests for this hour. You can send another at 14:03 UTC."; eb.Error.Message != want {
		t.Fatalf("message %q, want %q", eb.Error.Message, want)
	}
	if resp.Header.Get("Retry-After") != "180" || resp.Header.Get("RateLimit-Remaining") != "0" {
		t.Fatalf("headers %v", resp.Header)
	}
	// Another user is not affected; after 3 minutes alice may send one more.
	if resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("bob", "hi")); resp.StatusCode != 202 {
		t.Fatalf("bob: %d %s", resp.StatusCode, b)
	}
	clk.Advance(180 * time.Second)
	if resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("alice", "hi")); resp.StatusCode != 202 {
		t.Fatalf("alice after 3 min: %d %s", resp.StatusCode, b)
	}
	if resp, _ := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("alice", "hi")); resp.StatusCode != 429 {
		t.Fatalf("alice again: %d", resp.StatusCode)
	}
	// The usage route agrees.
	resp, b = e.Do(t, http.MethodGet, "/v1/users/alice/usage", harness.TenantKey, nil)
	var u struct {
		Requests struct {
			Limit, Remaining int
			ResetAt          string `json:"reset_at"`
		}
		Tokens struct {
			Unlimited bool
		}
		Queued, Running int
	}
	if err := json.Unmarshal(b, &u); err != nil || resp.StatusCode != 200 {
		t.Fatalf("usage: %d %s", resp.StatusCode, b)
	}
	if u.Requests.Limit != 20 || u.Requests.Remaining != 0 || u.Requests.ResetAt != "2026-11-29T15:03:00Z" || !u.Tokens.Unlimited || u.Queued != 21 {
		t.Fatalf("usage = %s", b)
	}
}

func TestTokenQuotaRefusal(t *testing.T) {
	clk := harness.NewClock(time.Date(2026, 11, 29, 9, 30, 0, 0, time.UTC))
	e := harness.Start(t, harness.Options{NoWorker: true, Clock: clk.Now, TenantExtra: "    tokens_per_hour: 3600\n"})
	body := harness.JobBody("alice", "hi")
	body["request"].(map[string]any)["max_tokens"] = 1000
	accepted := 0
	var last []byte
	for range 5 {
		resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
		if resp.StatusCode == 202 {
			accepted++
			continue
		}
		last = b
		if resp.StatusCode != 429 {
			t.Fatalf("%d %s", resp.StatusCode, b)
		}
	}
	if accepted != 3 {
		t.Fatalf("accepted %d jobs of ~1,0xx tokens within 3,600 tokens/hour, want 3", accepted)
	}
	eb := decodeErr(t, last)
	if eb.Error.Type != "rate_limit" || !strings.Contains(eb.Error.Message, "3,600 tokens for this hour") || eb.Error.RetryAfterSeconds <= 0 {
		t.Fatalf("%+v", eb.Error)
	}
	// A request bigger than the whole hourly quota is a 400 that says so.
	body["request"].(map[string]any)["max_tokens"] = 4000
	resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
	if eb := decodeErr(t, b); resp.StatusCode != 400 || !strings.Contains(eb.Error.Message, "whole hourly quota") {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
}

// hammer sends body n times at once, alternating between the api
// processes at urls, and counts the answers by status.
func hammer(t *testing.T, urls []string, body []byte, n int) map[int]int64 {
	t.Helper()
	var mu sync.Mutex
	got := map[int]int64{}
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest(http.MethodPost, urls[i%len(urls)]+"/v1/jobs", strings.NewReader(string(body)))
			req.Header.Set("x-api-key", harness.TenantKey)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			mu.Lock()
			got[resp.StatusCode]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	return got
}

func TestQuotaHoldsUnderConcurrencyAcrossAPIProcesses(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: "    requests_per_hour: 50\n    tokens_per_hour: 1000000\n    max_queued: 0\n"})
	second := harness.StartAPI(t, e)
	body, _ := json.Marshal(harness.JobBody("alice", "hello"))
	got := hammer(t, []string{e.API.URL, second.URL}, body, 200)
	// Refill during the burst is ~0.01 request per second; the quota is 50.
	if got[202] != 50 || got[429] != 150 || len(got) != 2 {
		t.Fatalf("answers %v; want exactly 50 accepted and 150 refused", got)
	}
}

func TestTokenQuotaHoldsUnderConcurrency(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: "    tokens_per_hour: 20000\n    max_queued: 0\n"})
	second := harness.StartAPI(t, e)
	body := harness.JobBody("alice", "hello")
	body["request"].(map[string]any)["max_tokens"] = 500
	b, _ := json.Marshal(body)
	got := hammer(t, []string{e.API.URL, second.URL}, b, 200)
	// Each job reserves its input estimate + 500.
	resp, lb := e.Do(t, http.MethodGet, "/v1/jobs?user_id=alice&limit=1", harness.TenantKey, nil)
	if resp.StatusCode != 200 {
		t.Fatal(string(lb))
	}
	var list struct{ Jobs []jobs.View }
	_ = json.Unmarshal(lb, &list)
	j, err := e.Store.Get(context.Background(), list.Jobs[0].ID)
	if err != nil {
		t.Fatal(err)
	}
	cost := int64(j.CostIn + j.CostOut)
	if want := 20000 / cost; got[202] != want {
		t.Fatalf("accepted %d jobs of %d tokens within 20,000 tokens/hour; want %d", got[202], cost, want)
	}
}

// quotaLeft reads alice's token quota.
func quotaLeft(t *testing.T, e *harness.Env) (requests, tokens int) {
	t.Helper()
	req, tok, err := e.Sched.Quotas(context.Background(), "acme", "alice", e.Config.Tenants[0].Policy("alice"))
	if err != nil {
		t.Fatal(err)
	}
	return req.Remaining, tok.Remaining
}

func TestRefundsExactlyOnce(t *testing.T) {
	const quota = "    requests_per_hour: 100\n    tokens_per_hour: 100000\n"
	reserve := func(t *testing.T, e *harness.Env, id string) int {
		j, err := e.Store.Get(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		return j.CostIn + j.CostOut
	}
	// Frozen time: no refill blurs the arithmetic.
	clock := func() func() time.Time {
		c := harness.NewClock(time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC))
		return c.Now
	}

	t.Run("cancel queued", func(t *testing.T) {
		e := harness.Start(t, harness.Options{NoWorker: true, Clock: clock(), TenantExtra: quota})
		v := e.Submit(t, harness.JobBody("alice", "hi"))
		if r, tk := quotaLeft(t, e); r != 99 || tk != 100000-reserve(t, e, v.ID) {
			t.Fatalf("after admission: %d requests %d tokens", r, tk)
		}
		resp, b := e.Do(t, http.MethodDelete, "/v1/jobs/"+v.ID, harness.TenantKey, nil)
		if resp.StatusCode != 200 || !strings.Contains(string(b), `"status":"canceled"`) {
			t.Fatalf("cancel: %d %s", resp.StatusCode, b)
		}
		if r, tk := quotaLeft(t, e); r != 100 || tk != 100000 {
			t.Fatalf("after cancel: %d requests %d tokens, want all back", r, tk)
		}
		// Canceling again is a 409 and refunds nothing more.
		resp, b = e.Do(t, http.MethodDelete, "/v1/jobs/"+v.ID, harness.TenantKey, nil)
		if eb := decodeErr(t, b); resp.StatusCode != 409 || eb.Error.Type != "conflict" {
			t.Fatalf("second cancel: %d %s", resp.StatusCode, b)
		}
		if r, tk := quotaLeft(t, e); r != 100 || tk != 100000 {
			t.Fatalf("after second cancel: %d %d", r, tk)
		}
		// A worker that gets the job later refunds nothing more either.
		harness.StartWorker(t, e)
		if n, _ := e.Sched.QueueLength(context.Background(), "sonnet"); n != 0 {
			t.Fatalf("canceled job still queued")
		}
	})

	t.Run("upstream 400", func(t *testing.T) {
		e := harness.Start(t, harness.Options{Clock: clock(), TenantExtra: quota})
		e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultBadRequest})
		v := e.Submit(t, harness.JobBody("alice", "hi"))
		if got := e.WaitTerminal(t, v.ID, 20*time.Second); got.Status != jobs.Failed {
			t.Fatalf("%s", got.Status)
		}
		harness.Eventually(t, 10*time.Second, func() bool { r, tk := quotaLeft(t, e); return r == 100 && tk == 100000 }, "the refund")
	})

	t.Run("success uses less than reserved", func(t *testing.T) {
		e := harness.Start(t, harness.Options{Clock: clock(), TenantExtra: quota})
		v := e.Submit(t, harness.JobBody("alice", "hi [[reply_tokens=7]]"))
		got := e.WaitTerminal(t, v.ID, 20*time.Second)
		used := got.Usage.InputTokens + got.Usage.OutputTokens
		harness.Eventually(t, 10*time.Second, func() bool { r, tk := quotaLeft(t, e); return r == 99 && tk == 100000-used }, "settlement to the real usage (%d tokens)", used)
	})

	t.Run("expiry", func(t *testing.T) {
		c := harness.NewClock(time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC))
		e := harness.Start(t, harness.Options{NoWorker: true, Clock: c.Now, TenantExtra: quota})
		body := harness.JobBody("alice", "hi")
		body["deadline_seconds"] = 5
		v := e.Submit(t, body)
		c.Advance(6 * time.Second)
		harness.StartWorker(t, e) // its dispatcher finds the deadline passed
		if got := e.WaitTerminal(t, v.ID, 20*time.Second); got.Status != jobs.Expired {
			t.Fatalf("%s", got.Status)
		}
		harness.Eventually(t, 10*time.Second, func() bool { r, tk := quotaLeft(t, e); return r == 100 && tk == 100000 }, "the refund")
		if e.Fake.Stats().Requests != 0 {
			t.Fatal("an expired job reached the upstream")
		}
	})

	t.Run("cancel running", func(t *testing.T) {
		e := harness.Start(t, harness.Options{Clock: clock(), TenantExtra: quota, Fake: fakeanthropic.Config{TokensPerSecond: 20}})
		v := e.Submit(t, harness.JobBody("alice", "a long one [[reply_tokens=200]]"))
		harness.Eventually(t, 10*time.Second, func() bool { return e.Get(t, v.ID).Status == jobs.Running && e.Fake.Stats().InFlight == 1 }, "the call to start")
		resp, b := e.Do(t, http.MethodDelete, "/v1/jobs/"+v.ID, harness.TenantKey, nil)
		if resp.StatusCode != 200 {
			t.Fatalf("cancel: %d %s", resp.StatusCode, b)
		}
		// The upstream call stops promptly (not after 10 s of output).
		harness.Eventually(t, 5*time.Second, func() bool { return e.Fake.Stats().InFlight == 0 }, "the upstream call to stop")
		// Charged what it used: 1 request, and more than nothing but less than reserved.
		var r, tk int
		harness.Eventually(t, 10*time.Second, func() bool {
			r, tk = quotaLeft(t, e)
			return tk > 100000-reserve(t, e, v.ID)
		}, "the settlement")
		if r != 99 || tk >= 100000 {
			t.Fatalf("after cancel running: %d requests %d tokens", r, tk)
		}
		if st := e.Get(t, v.ID); st.Status != jobs.Canceled {
			t.Fatalf("status %s", st.Status)
		}
	})
}

func TestQueueLimitAndOverload(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: "    max_queued: 2\n"})
	for range 2 {
		e.Submit(t, harness.JobBody("alice", "hi"))
	}
	resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("alice", "hi"))
	eb := decodeErr(t, b)
	if resp.StatusCode != 429 || eb.Error.Type != "queue_limit" || resp.Header.Get("Retry-After") == "" || !strings.Contains(eb.Error.Message, "2 requests waiting") {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	if resp, _ := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("bob", "hi")); resp.StatusCode != 202 {
		t.Fatalf("another user: %d", resp.StatusCode)
	}

	// A tenant whose max wait is 2 minutes, on a group of 6 RPM.
	slow := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: "    max_wait: 2m\n    max_queued: 0\n", ExtraConfig: ""})
	slow.Config.ModelGroups[0].RPM = 6
	accepted := 0
	var last []byte
	var lastResp *http.Response
	for range 30 {
		resp, b := slow.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody(fmt.Sprint("u", accepted), "hi"))
		if resp.StatusCode != 202 {
			last, lastResp = b, resp
			break
		}
		accepted++
	}
	eb = decodeErr(t, last)
	if lastResp == nil || lastResp.StatusCode != 503 || eb.Error.Type != "overloaded" || lastResp.Header.Get("Retry-After") == "" || eb.Error.RetryAfterSeconds < 1 {
		t.Fatalf("after %d accepted: %s", accepted, last)
	}
	// 6 RPM with a 3 s burst: about one job every 10 s fits in 2 minutes.
	if accepted < 10 || accepted > 14 {
		t.Fatalf("accepted %d jobs before refusing, want about 12", accepted)
	}
}

func TestMaxTokensPolicies(t *testing.T) {
	for _, policy := range []string{"clamp", "reject"} {
		t.Run(policy, func(t *testing.T) {
			e := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: "    max_tokens_cap: 500\n    max_tokens_policy: " + policy + "\n    max_messages: 3\n"})
			body := harness.JobBody("alice", "hi")
			body["request"].(map[string]any)["max_tokens"] = 800
			resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
			if policy == "clamp" {
				var v jobs.View
				_ = json.Unmarshal(b, &v)
				if resp.StatusCode != 202 || v.MaxTokens != 500 {
					t.Fatalf("%d %s", resp.StatusCode, b)
				}
			} else if eb := decodeErr(t, b); resp.StatusCode != 400 || eb.Error.Field != "request.max_tokens" || !strings.Contains(eb.Error.Message, "500") {
				t.Fatalf("%d %s", resp.StatusCode, b)
			}
			msgs := []any{}
			for i := range 4 {
				msgs = append(msgs, map[string]any{"role": []string{"user", "assistant"}[i%2], "content": "x"})
			}
			body["request"].(map[string]any)["messages"] = msgs
			body["request"].(map[string]any)["max_tokens"] = 10
			resp, b = e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
			if eb := decodeErr(t, b); resp.StatusCode != 400 || eb.Error.Field != "request.messages" || !strings.Contains(eb.Error.Message, "at most 3") {
				t.Fatalf("%d %s", resp.StatusCode, b)
			}
		})
	}
}

func TestIdempotencyKey(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	post := func(user, key, text string) (*http.Response, []byte) {
		return submitWith(t, e, harness.JobBody(user, text), key)
	}
	r1, b1 := post("alice", "k1", "hello")
	r2, b2 := post("alice", "k1", "hello")
	var v1, v2 jobs.View
	_ = json.Unmarshal(b1, &v1)
	_ = json.Unmarshal(b2, &v2)
	if r1.StatusCode != 202 || r2.StatusCode != 202 || v1.ID != v2.ID || v1.Token != v2.Token || r2.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("replay: %d %s / %d %s", r1.StatusCode, b1, r2.StatusCode, b2)
	}
	r3, b3 := post("alice", "k1", "something else")
	if eb := decodeErr(t, b3); r3.StatusCode != 409 || eb.Error.Type != "conflict" {
		t.Fatalf("%d %s", r3.StatusCode, b3)
	}
	// Keys are per user.
	r4, b4 := post("bob", "k1", "hello")
	var v4 jobs.View
	_ = json.Unmarshal(b4, &v4)
	if r4.StatusCode != 202 || v4.ID == v1.ID {
		t.Fatalf("another user's key: %d %s", r4.StatusCode, b4)
	}
}

func TestListing(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	var ids []string
	for i := range 7 {
		ids = append(ids, e.Submit(t, harness.JobBody([]string{"alice", "bob"}[i%2], "hi")).ID)
	}
	// Cancel one of alice's.
	if resp, b := e.Do(t, http.MethodDelete, "/v1/jobs/"+ids[2], harness.TenantKey, nil); resp.StatusCode != 200 {
		t.Fatalf("%s", b)
	}
	type page struct {
		Jobs       []jobs.View `json:"jobs"`
		NextCursor string      `json:"next_cursor"`
	}
	get := func(q string) page {
		resp, b := e.Do(t, http.MethodGet, "/v1/jobs?"+q, harness.TenantKey, nil)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d %s", q, resp.StatusCode, b)
		}
		var p page
		_ = json.Unmarshal(b, &p)
		return p
	}
	var all []string
	q := "limit=3"
	for {
		p := get(q)
		for _, j := range p.Jobs {
			all = append(all, j.ID)
		}
		if p.NextCursor == "" {
			break
		}
		q = "limit=3&cursor=" + p.NextCursor
	}
	if len(all) != 7 || all[0] != ids[6] || all[6] != ids[0] {
		t.Fatalf("listing %v, want newest first %v", all, ids)
	}
	p := get("user_id=alice&status=queued")
	if len(p.Jobs) != 3 {
		t.Fatalf("alice's queued: %d", len(p.Jobs))
	}
	for _, j := range p.Jobs {
		if j.UserID != "alice" || j.Status != jobs.Queued {
			t.Fatalf("%+v", j)
		}
	}
	if p := get("user_id=alice&status=canceled"); len(p.Jobs) != 1 || p.Jobs[0].ID != ids[2] {
		t.Fatalf("canceled: %+v", p.Jobs)
	}
	for _, bad := range []string{"limit=0", "limit=1000", "status=done", "cursor=!!", "user_id=" + strings.Repeat("x", 300)} {
		resp, b := e.Do(t, http.MethodGet, "/v1/jobs?"+bad, harness.TenantKey, nil)
		if resp.StatusCode != 400 {
			t.Fatalf("%s: %d %s", bad, resp.StatusCode, b)
		}
	}
	// Another tenant sees none of them.
	resp, b := e.Do(t, http.MethodGet, "/v1/jobs", harness.OtherTenantKey, nil)
	if resp.StatusCode != 200 || strings.Contains(string(b), ids[0]) {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
}
