package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/labstack/echo/v5"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
)

// The admission benchmarks drive POST /v1/jobs with 64 concurrent clients
// for b.N requests in all, from 10,000 users in turn, and report
// admissions per second and the p50/p99 latency. BenchmarkAdmission is sluice's real path (auth, validation,
// estimate, the admission script: idempotency, quotas, queue cap, bounded
// wait, fair queue, record, event); BenchmarkNaiveEnqueue is the floor it
// is compared with: an Echo handler that parses the body and calls asynq
// Enqueue, nothing else, on the same machine and Redis setup.
//
//	go test -run '^$' -bench 'Admission$|NaiveEnqueue' -benchtime 20000x ./api/
//
// Redis runs with AOF and appendfsync everysec (a host crash may lose the
// last second of accepted jobs); BenchmarkAdmissionFsyncAlways is the same
// with appendfsync always (nothing acknowledged is lost):
//
//	go test -run '^$' -bench 'Admission' -benchtime 20000x ./api/
func BenchmarkAdmission(b *testing.B) { benchAdmission(b) }

func BenchmarkAdmissionFsyncAlways(b *testing.B) { benchAdmission(b, "--appendfsync", "always") }

// BenchmarkAdmissionNoQuotas is BenchmarkAdmission for a tenant without
// hourly quotas: the quota script is skipped, what is left is the group's
// admission script alone.
func BenchmarkAdmissionNoQuotas(b *testing.B) {
	e := harness.Start(b, harness.Options{NoWorker: true, Quiet: true,
		TenantExtra: "    max_queued: 0\n    max_wait: 0s\n"})
	if err := e.RDB.ConfigResetStat(context.Background()).Err(); err != nil {
		b.Fatal(err)
	}
	drive(b, e.API.URL+"/v1/jobs", 10000)
	reportScriptTime(b, e.RDB, b.N)
}

func benchAdmission(b *testing.B, redisArgs ...string) {
	e := harness.Start(b, harness.Options{NoWorker: true, Quiet: true, RedisArgs: redisArgs,
		TenantExtra: "    requests_per_hour: 100000000\n    tokens_per_hour: 1000000000000\n    max_queued: 0\n    max_wait: 0s\n"})
	if err := e.RDB.ConfigResetStat(context.Background()).Err(); err != nil {
		b.Fatal(err)
	}
	drive(b, e.API.URL+"/v1/jobs", 10000)
	reportScriptTime(b, e.RDB, b.N)
}

// reportScriptTime reports the Redis time the scripts took per admission
// (redistest.ScriptTime) and the admissions per second one Redis core
// could run at that cost: the ceiling of one model group, whose scripts
// all run on one Redis (one shard in a cluster).
func reportScriptTime(b *testing.B, rdb redis.Cmdable, n int) {
	usec, calls := redistest.ScriptTime(b, rdb)
	if n == 0 {
		return
	}
	b.ReportMetric(float64(calls)/float64(n), "scripts/admission")
	per := usec / float64(n)
	b.ReportMetric(per, "redis-µs/admission")
	if per > 0 {
		b.ReportMetric(1e6/per, "one-core-ceiling/s")
	}
}

func BenchmarkNaiveEnqueue(b *testing.B) {
	e := harness.Start(b, harness.Options{NoWorker: true, Quiet: true})
	aq := asynq.NewClientFromRedisClient(e.RDB)
	defer aq.Close()
	ec := echo.New()
	ec.POST("/v1/jobs", func(c *echo.Context) error {
		var body map[string]any
		if err := json.NewDecoder(c.Request().Body).Decode(&body); err != nil {
			return c.JSON(400, map[string]string{"error": err.Error()})
		}
		payload, _ := json.Marshal(body)
		info, err := aq.EnqueueContext(c.Request().Context(), asynq.NewTask("naive", payload, asynq.Queue("naive")))
		if err != nil {
			return err
		}
		return c.JSON(202, map[string]string{"id": info.ID})
	})
	srv := httptest.NewServer(ec)
	defer srv.Close()
	if err := e.RDB.ConfigResetStat(context.Background()).Err(); err != nil {
		b.Fatal(err)
	}
	drive(b, srv.URL+"/v1/jobs", 10000)
	// asynq's enqueue is one script too: its Redis time, measured the same
	// way, is the floor sluice's admission script is compared with.
	reportScriptTime(b, e.RDB, b.N)
}

func drive(b *testing.B, url string, users int) {
	const clients = 64
	tr := &http.Transport{MaxIdleConnsPerHost: clients, MaxConnsPerHost: clients}
	hc := &http.Client{Transport: tr}
	defer tr.CloseIdleConnections()
	bodies := make([][]byte, users)
	for i := range bodies {
		bodies[i], _ = json.Marshal(harness.JobBody(fmt.Sprint("user-", i), "Hello, how do token buckets work?"))
	}
	var next atomic.Int64
	lat := make([][]time.Duration, clients)
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(bodies[i%int64(users)]))
				req.Header.Set("x-api-key", harness.TenantKey)
				req.Header.Set("content-type", "application/json")
				t0 := time.Now()
				resp, err := hc.Do(req)
				if err != nil {
					b.Error(err)
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 202 {
					b.Errorf("status %d", resp.StatusCode)
					return
				}
				lat[c] = append(lat[c], time.Since(t0))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	slices.Sort(all)
	if len(all) == 0 {
		return
	}
	b.ReportMetric(float64(len(all))/elapsed.Seconds(), "req/s")
	b.ReportMetric(ms(all[len(all)/2]), "p50-ms")
	b.ReportMetric(ms(all[len(all)*99/100]), "p99-ms")
}
