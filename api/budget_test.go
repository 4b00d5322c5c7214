package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
)

// budgetBody is a job of max_tokens 1,000: at the shipped Sonnet price
// ($15 per million output tokens) it holds $0.015 plus its input.
func budgetBody(user, text string) map[string]any {
	return map[string]any{"user_id": user, "request": map[string]any{"model": harness.Model, "max_tokens": 1000,
		"messages": []any{map[string]any{"role": "user", "content": text}}}}
}

// counter reads a budget counter in µ$ (0 when absent).
func counter(t *testing.T, e *harness.Env, key string) int64 {
	t.Helper()
	v, err := e.RDB.Get(context.Background(), key).Result()
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(v, 10, 64)
	return n
}

// A user's daily budget holds each job's worst case at admission, refuses
// the job that would pass it with a sentence naming the budget and when it
// renews, and settles to what the calls cost once they end: the counter
// then equals the jobs' costs to the µ$, and there is room again.
func TestBudgetRefusesAndSettles(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true,
		TenantExtra: "    budget_usd_per_day: 0.05\n    max_queued: 0\n    max_wait: 0s\n"})
	day := time.Now().UTC().Format("20060102")
	key := rkeys.UserBudget("acme", "alice", "d", day)
	var ids []string
	for i := 0; i < 3; i++ {
		ids = append(ids, e.Submit(t, budgetBody("alice", fmt.Sprintf("question %d [[reply_tokens=5]]", i))).ID)
	}
	held := counter(t, e, key)
	if held <= 45000 || held > 50000 {
		t.Fatalf("three jobs hold %d µ$, want just over 3 × $0.015", held)
	}
	resp, body := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, budgetBody("alice", "question 3 [[reply_tokens=5]]"))
	var refusal struct {
		Error struct {
			Type, Message string
			Budget        string  `json:"budget"`
			LimitUSD      float64 `json:"limit_usd"`
			RenewsAt      string  `json:"renews_at"`
		}
	}
	_ = json.Unmarshal(body, &refusal)
	tomorrow := time.Now().UTC().AddDate(0, 0, 1).Format("2006-01-02")
	if resp.StatusCode != http.StatusTooManyRequests || refusal.Error.Type != "budget" || refusal.Error.Budget != "user_day" ||
		refusal.Error.LimitUSD != 0.05 || !strings.HasPrefix(refusal.Error.RenewsAt, tomorrow+"T00:00:00") ||
		!strings.Contains(refusal.Error.Message, "Your daily budget of $0.05 is spent") ||
		!strings.Contains(refusal.Error.Message, "It renews at "+tomorrow+" 00:00 UTC") || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("the fourth job: %d %s (Retry-After %q)", resp.StatusCode, body, resp.Header.Get("Retry-After"))
	}
	if got := counter(t, e, key); got != held {
		t.Fatalf("a refusal changed the counter: %d → %d", held, got)
	}
	// The user can see where it stands.
	_, ub := e.Do(t, http.MethodGet, "/v1/users/alice/usage", harness.TenantKey, nil)
	var usage struct {
		Budgets map[string]struct {
			LimitUSD     float64 `json:"limit_usd"`
			UsedUSD      float64 `json:"used_usd"`
			RemainingUSD float64 `json:"remaining_usd"`
			RenewsAt     string  `json:"renews_at"`
		}
	}
	_ = json.Unmarshal(ub, &usage)
	if b, ok := usage.Budgets["user_day"]; !ok || b.LimitUSD != 0.05 || b.UsedUSD != float64(held)/1e6 || len(usage.Budgets) != 1 {
		t.Errorf("the user's usage: %s", ub)
	}

	harness.StartWorker(t, e)
	var spent int64
	for _, id := range ids {
		v := e.WaitTerminal(t, id, 20*time.Second)
		if v.Status != jobs.Succeeded || v.CostUSD == nil {
			t.Fatalf("job %s: %+v", id, v)
		}
		spent += int64(*v.CostUSD*1e6 + 0.5)
	}
	harness.Eventually(t, 10*time.Second, func() bool { return counter(t, e, key) == spent },
		"the budget to settle to what the calls cost (%d µ$)", spent)
	e.Submit(t, budgetBody("alice", "room again [[reply_tokens=5]]"))
}

// 200 clients over two api processes ask at once for more than a tenant's
// budget holds: exactly as many jobs are admitted as fit, and the counter
// never passes the budget.
func TestBudgetHoldsUnderConcurrency(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true,
		TenantExtra: "    tenant_budget_usd_per_day: 1.00\n    max_queued: 0\n    max_wait: 0s\n"})
	apis := []string{e.API.URL, harness.StartAPI(t, e).URL}
	b, _ := json.Marshal(budgetBody("u000", "the same question"))
	var admitted, refused atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := strings.Replace(string(b), "u000", fmt.Sprintf("u%03d", i), 1)
			req, _ := http.NewRequest(http.MethodPost, apis[i%2]+"/v1/jobs", strings.NewReader(body))
			req.Header.Set("x-api-key", harness.TenantKey)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			switch resp.StatusCode {
			case http.StatusAccepted:
				admitted.Add(1)
			case http.StatusTooManyRequests:
				refused.Add(1)
			default:
				t.Errorf("status %d", resp.StatusCode)
			}
		}()
	}
	wg.Wait()
	day := time.Now().UTC().Format("20060102")
	got := counter(t, e, rkeys.TenantBudget("acme", "d", day))
	n := admitted.Load()
	if n == 0 || got%n != 0 {
		t.Fatalf("%d admitted holding %d µ$ in all: not equal holds", n, got)
	}
	hold := got / n
	if got > 1000000 || got+hold <= 1000000 || n+refused.Load() != 200 {
		t.Fatalf("%d admitted × %d µ$ = %d µ$ against a budget of 1,000,000 µ$ (%d refused): want as many as fit, no more",
			n, hold, got, refused.Load())
	}
	t.Logf("%d of 200 admitted, %d µ$ each, %d µ$ held of 1,000,000", n, hold, got)
}

// With a dollar budget, a model the price list lacks cannot be charged:
// refused with the fix, before anything is held.
func TestBudgetNeedsAPrice(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: "    budget_usd_per_month: 10\n"})
	body := budgetBody("alice", "hi")
	body["request"].(map[string]any)["model"] = "claude-sonnet-test"
	resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "has no price") || !strings.Contains(string(b), "usage.prices") {
		t.Fatalf("unpriced model under a budget: %d %s", resp.StatusCode, b)
	}
}
