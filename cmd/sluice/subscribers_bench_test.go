package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// BenchmarkSubscribers measures one api process (a separate OS process,
// `sluice api`) holding 10,000 concurrent event streams, one per queued job
// (SLUICE_BENCH_SUBSCRIBERS changes the count):
//
//   - api-RSS-MB: the api process's resident memory with every stream open
//     (the peak, VmHWM, over the whole run);
//   - dispatch-p50/p99/max-ms: each benchmark round dispatches the head
//     job (the scheduler's own dispatch script, as a worker's dispatcher
//     calls it) and times, for every other subscriber, the arrival of the
//     `queued` event with its new position, from just before the dispatch;
//   - delta-p50/p99-ms: a `delta` event appended to a random started job's
//     log (the worker's own Store.Append: the dispatched jobs are started as
//     a worker starts them) until its subscriber reads it, 100 samples per
//     round, with all the other streams open.
//
// It makes SLUICE_BENCH_ROUNDS (10) dispatches, over a second apart since a
// job's position is pushed at most once a second, whatever b.N is: run it
// once, with
//
//	go test -run '^$' -bench Subscribers -benchtime 1x -timeout 30m ./cmd/sluice/
func BenchmarkSubscribers(b *testing.B) {
	n, rounds := envInt(b, "SLUICE_BENCH_SUBSCRIBERS", 10000), envInt(b, "SLUICE_BENCH_ROUNDS", 10)
	c := startCluster(b, fakeanthropic.Group{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 1000000, InputTPM: 1000000000, OutputTPM: 1000000000},
		8, fakeanthropic.Config{}, "")
	apiPID := c.apiProc.cmd.Process.Pid

	// The queue: n users with one job each. Admission from 32 goroutines.
	type sub struct {
		id, token string
		mu        sync.Mutex
		positions []posAt // every `queued` event
		deltas    chan time.Time
		gone      bool // dispatched: no more positions
	}
	subs := make([]*sub, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for range 32 {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				v, err := c.trySubmit(fmt.Sprintf("user-%05d", i), "hello", 16)
				if err != nil {
					errs <- err
					return
				}
				subs[i] = &sub{id: v.ID, token: v.Token, deltas: make(chan time.Time, 4)}
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	b.Logf("%d jobs queued", n)

	// The streams: one plain TCP connection each (one goroutine per stream,
	// so the clients, on the same cores, cost as little as they can), opened
	// 256 at a time.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	host := strings.TrimPrefix(c.api, "http://")
	var firsts atomic.Int64
	var conns sync.WaitGroup
	gate := make(chan struct{}, 256)
	for _, s := range subs {
		gate <- struct{}{}
		conns.Go(func() {
			released := false
			release := func() {
				if !released {
					released = true
					<-gate
				}
			}
			defer release()
			conn, err := net.DialTimeout("tcp", host, 10*time.Second)
			if err != nil {
				b.Errorf("stream %s: %v", s.id, err)
				return
			}
			stop := context.AfterFunc(ctx, func() { conn.Close() })
			defer stop()
			defer conn.Close()
			fmt.Fprintf(conn, "GET /v1/jobs/%s/events?token=%s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", s.id, s.token, host)
			br := bufio.NewReaderSize(conn, 1024)
			status, err := br.ReadString('\n')
			if err != nil || !strings.HasPrefix(status, "HTTP/1.1 200") {
				b.Errorf("stream %s: %q %v", s.id, status, err)
				return
			}
			for { // headers
				line, err := br.ReadString('\n')
				if err != nil {
					return
				}
				if line == "\r\n" {
					break
				}
			}
			sc := bufio.NewScanner(httputil.NewChunkedReader(br))
			var event string
			for sc.Scan() {
				line := sc.Text()
				switch {
				case strings.HasPrefix(line, "event: "):
					event = line[len("event: "):]
				case strings.HasPrefix(line, "data: ") && event == "queued":
					var d struct{ Position int }
					_ = json.Unmarshal([]byte(line[len("data: "):]), &d)
					s.mu.Lock()
					s.positions = append(s.positions, posAt{d.Position, time.Now()})
					first := len(s.positions) == 1
					s.mu.Unlock()
					if first {
						firsts.Add(1)
						release() // the next one may open; this one reads on
					}
				case strings.HasPrefix(line, "data: ") && event == "delta":
					select {
					case s.deltas <- time.Now():
					default:
					}
				}
			}
		})
	}
	defer func() { cancel(); conns.Wait() }()
	harness.Eventually(b, 5*time.Minute, func() bool { return firsts.Load() == int64(n) || b.Failed() }, "every stream's first event")
	if b.Failed() {
		b.FailNow()
	}
	rssOpen := procStatusKB(b, apiPID, "VmRSS")
	b.Logf("%d streams open; api RSS %d MB", n, rssOpen/1024)

	rdb := c.redis.Client(b)
	store := jobs.NewStore(rdb, jobs.Options{})
	sched := scheduler.New(rdb, store, scheduler.Options{LeaseTTL: time.Hour}) // no worker renews the leases
	group := &config.ModelGroup{Name: "sonnet", RPM: 1000000, InputTPM: 1000000000, OutputTPM: 1000000000, MaxConcurrency: 1 << 30, Burst: 3 * time.Second}

	var dispatchDelays, deltaDelays []time.Duration
	lastPush := time.Now()
	cpuAPI0, cpuRedis0, cpuSelf0 := procCPU(b, apiPID), redisCPU(b, rdb), procCPU(b, os.Getpid())
	profiled := make(chan struct{})
	if path := os.Getenv("SLUICE_BENCH_PROFILE"); path != "" {
		// The api's CPU profile over the first rounds, for `go tool pprof`.
		go func() {
			defer close(profiled)
			req, _ := http.NewRequest(http.MethodGet, c.api+"/debug/pprof/profile?seconds=8", nil)
			req.Header.Set("x-api-key", harness.AdminKey)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			defer resp.Body.Close()
			f, err := os.Create(path)
			if err != nil {
				b.Error(err)
				return
			}
			defer f.Close()
			_, _ = io.Copy(f, resp.Body)
		}()
	} else {
		close(profiled)
	}
	b.ResetTimer()
	for range rounds {
		if wait := time.Until(lastPush.Add(scheduler.PushEvery + 100*time.Millisecond)); wait > 0 {
			time.Sleep(wait) // pacing: a job's position is pushed at most once a second
		}
		before := make([]int, n)
		for i, s := range subs {
			s.mu.Lock()
			before[i] = len(s.positions)
			s.mu.Unlock()
		}
		t0 := time.Now()
		res, err := sched.Dispatch(ctx, group, 1)
		if err != nil || len(res.Jobs) != 1 {
			b.Fatalf("dispatch: %+v %v", res, err)
		}
		var waiting, running []*sub
		var idx []int
		for i, s := range subs {
			if s.id == res.Jobs[0].JobID {
				s.gone = true
			}
			if !s.gone {
				waiting = append(waiting, s)
				idx = append(idx, i)
			} else {
				running = append(running, s)
			}
		}
		// The dispatched job starts, as a worker would start it.
		job, err := store.Get(ctx, res.Jobs[0].JobID)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := sched.Start(ctx, scheduler.Attempt{Group: group, Job: job, Dispatch: res.Jobs[0].Dispatch}, time.Now()); err != nil {
			b.Fatal(err)
		}
		harness.Eventually(b, time.Minute, func() bool {
			for k, s := range waiting {
				s.mu.Lock()
				got := len(s.positions) > before[idx[k]]
				s.mu.Unlock()
				if !got {
					return false
				}
			}
			return true
		}, "every waiting stream's new position")
		lastPush = time.Now()
		for k, s := range waiting {
			s.mu.Lock()
			p := s.positions[before[idx[k]]]
			prev := s.positions[before[idx[k]]-1]
			s.mu.Unlock()
			if p.pos != prev.pos-1 {
				b.Errorf("job %s: position %d after %d, want one less", s.id, p.pos, prev.pos)
			}
			dispatchDelays = append(dispatchDelays, p.at.Sub(t0))
		}

		for range 100 {
			s := running[rand.IntN(len(running))]
			t1 := time.Now()
			if _, err := store.Append(ctx, s.id, jobs.Running, 0, "delta", map[string]string{"text": "x"}); err != nil {
				b.Fatal(err)
			}
			select {
			case at := <-s.deltas:
				deltaDelays = append(deltaDelays, at.Sub(t1))
			case <-time.After(10 * time.Second):
				b.Fatalf("delta on %s never arrived", s.id)
			}
		}
	}
	b.StopTimer()
	<-profiled
	b.Logf("CPU seconds over the rounds: api %.2f, redis %.2f, this benchmark (the clients) %.2f",
		procCPU(b, apiPID)-cpuAPI0, redisCPU(b, rdb)-cpuRedis0, procCPU(b, os.Getpid())-cpuSelf0)
	if os.Getenv("SLUICE_BENCH_COMMANDSTATS") == "1" {
		stats, _ := rdb.Info(ctx, "commandstats").Result()
		_ = os.WriteFile(os.Getenv("SLUICE_BENCH_COMMANDSTATS_FILE"), []byte(stats), 0o644)
	}
	peak := procStatusKB(b, apiPID, "VmHWM")
	b.ReportMetric(float64(peak)/1024, "api-RSS-MB")
	b.ReportMetric(float64(n), "subscribers")
	report := func(name string, d []time.Duration) {
		slices.Sort(d)
		q := func(p float64) float64 { return float64(d[int(p*float64(len(d)-1))].Microseconds()) / 1000 }
		b.Logf("%s: min %.1f ms, p10 %.1f ms, p50 %.1f ms", name, q(0), q(0.1), q(0.5))
		b.ReportMetric(q(0.5), name+"-p50-ms")
		b.ReportMetric(q(0.99), name+"-p99-ms")
		b.ReportMetric(float64(d[len(d)-1].Microseconds())/1000, name+"-max-ms")
	}
	report("dispatch", dispatchDelays)
	report("delta", deltaDelays)
}

type posAt struct {
	pos int
	at  time.Time
}

func envInt(tb testing.TB, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 2 {
		tb.Fatalf("%s=%q: want a number above 1", name, v)
	}
	return n
}

// procCPU is the user+system CPU seconds of a process so far.
func procCPU(tb testing.TB, pid int) float64 {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

// redisCPU is the Redis server's user+system CPU seconds so far.
func redisCPU(tb testing.TB, rdb *redis.Client) float64 {
	tb.Helper()
	info, err := rdb.Info(context.Background(), "cpu").Result()
	if err != nil {
		tb.Fatal(err)
	}
	var total float64
	for _, line := range strings.Split(info, "\r\n") {
		for _, k := range []string{"used_cpu_sys:", "used_cpu_user:"} {
			if v, ok := strings.CutPrefix(line, k); ok {
				x, _ := strconv.ParseFloat(v, 64)
				total += x
			}
		}
	}
	return total
}

// procStatusKB reads a kB field (VmRSS, VmHWM) of /proc/PID/status.
func procStatusKB(tb testing.TB, pid int, field string) int {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return kb
		}
	}
	tb.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}
