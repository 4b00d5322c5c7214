package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
)

// TestBudgetAcrossProcesses: 200 clients at once, spread over two api
// processes, ask for more than a tenant's daily dollar budget holds, while
// two worker processes run and settle the jobs admitted. Admission holds
// each job's worst case (input estimate + max_tokens at the model's price)
// atomically in the tenant's slot, so the budget's counter (what ended jobs
// cost plus what the others hold) never passes the budget: no job can be
// admitted that the budget could not pay for at its worst. Each job's hold
// is settled to its real cost exactly once, so at the end the counter
// equals the jobs' costs to the µ$, and the spend is within the budget.
func TestBudgetAcrossProcesses(t *testing.T) {
	const budget = 500_000 // µ$: $0.50 a day
	c := startClusterTenant(t, fakeanthropic.Group{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 100000, InputTPM: 1e8, OutputTPM: 1e8},
		50, fakeanthropic.Config{TokensPerSecond: 2000, ReplyTokens: 300},
		"    tenant_budget_usd_per_day: 0.50\n    max_queued: 0\n    max_wait: 0s\n", "")
	api2 := c.start(t, "api").baseURL(t)
	c.start(t, "worker")
	c.start(t, "worker")
	rdb := redis.NewClient(&redis.Options{Addr: c.redis.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	key := rkeys.TenantBudget("acme", "d", time.Now().UTC().Format("20060102"))
	read := func() int64 {
		v, err := rdb.Get(context.Background(), key).Result()
		if err != nil {
			return 0
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		return n
	}

	// A watcher samples the counter while the clients run: it must never
	// pass the budget.
	stop := make(chan struct{})
	var peak int64
	var watched sync.WaitGroup
	watched.Add(1)
	go func() {
		defer watched.Done()
		for {
			peak = max(peak, read())
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond): // a sampling period, not a wait for work
			}
		}
	}()

	apis := []string{c.api, api2}
	var mu sync.Mutex
	var ids []string
	refused := 0
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := fmt.Sprintf(`{"user_id":"u%03d","request":{"model":%q,"max_tokens":1000,"messages":[{"role":"user","content":"grade my essay, part %d"}]}}`, i, harness.Model, i)
			req, _ := http.NewRequest(http.MethodPost, apis[i%2]+"/v1/jobs", strings.NewReader(body))
			req.Header.Set("x-api-key", harness.TenantKey)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			mu.Lock()
			defer mu.Unlock()
			switch resp.StatusCode {
			case http.StatusAccepted:
				var v jobs.View
				if err := json.Unmarshal(b, &v); err != nil {
					t.Error(err)
					return
				}
				ids = append(ids, v.ID)
			case http.StatusTooManyRequests:
				if !strings.Contains(string(b), `"budget"`) || !strings.Contains(string(b), "renews") {
					t.Errorf("refusal: %s", b)
				}
				refused++
			default:
				t.Errorf("status %d: %s", resp.StatusCode, b)
			}
		}()
	}
	wg.Wait()
	done := c.waitAll(t, ids, 2*time.Minute)
	close(stop)
	watched.Wait()

	var spent int64
	for id, v := range done {
		if v.Status != jobs.Succeeded || v.CostUSD == nil {
			t.Fatalf("job %s: %s, cost %v", id, v.Status, v.CostUSD)
		}
		spent += int64(*v.CostUSD*1e6 + 0.5)
	}
	final := read()
	if len(ids)+refused != 200 || refused == 0 {
		t.Fatalf("%d admitted, %d refused of 200: want every client answered and some refused", len(ids), refused)
	}
	if peak > budget {
		t.Errorf("the budget's counter reached %d µ$, past the budget of %d µ$", peak, budget)
	}
	// cost_usd is rounded to the µ$ per job: the sum may differ from the
	// counter by half a µ$ per job.
	if d := final - spent; d > int64(len(ids)) || d < -int64(len(ids)) {
		t.Errorf("counter %d µ$ after every job ended, jobs' costs %d µ$: settled more or less than once", final, spent)
	}
	if final > budget {
		t.Errorf("spent %d µ$ of a %d µ$ budget", final, budget)
	}
	t.Logf("%d admitted, %d refused; counter peaked at %d µ$ of %d; spent %d µ$ (jobs' costs %d µ$)", len(ids), refused, peak, budget, final, spent)
}
