package chaos

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/proctest"
)

// The fault suite. Each scenario runs on its own processes (redistest's
// redis-server with AOF, the fake upstream as a process of this test
// binary, one `sluice api` and two `sluice worker`s), drives load through
// the api as clients would and injects one fault. Expected in every
// scenario: every request accepted, every accepted job succeeded, none
// lost, no answer bought twice, no 5xx but 503.
//
//	go test -race -count=1 -v ./chaos                      # short: CI, under 3 minutes
//	go test -race -count=1 -v -timeout 30m ./chaos -args -chaos.full   # full: make chaos
//
// -chaos.lease-ttl sets worker.lease_ttl (default 5s, sluice's own default
// is 15s); SLUICE_CHAOS=full is the same as -chaos.full.
//
// Each scenario's process logs, configuration and upstream journal are kept
// in test-artifacts/chaos/<size>/<scenario>/ (or under $SLUICE_ARTIFACTS),
// and the table in test-artifacts/chaos/results-<size>.md.

// pick is the short or the full size of a figure.
func pick[T any](short, fullSize T) T {
	if full() {
		return fullSize
	}
	return short
}

// scenario is one fault.
type scenario struct {
	id    string // subtest and folder name
	title string // the table's first column
	opts  clusterOpts
	// run drives the load, injects the fault and returns a sentence that
	// says what was done, when; the load's submissions may still run.
	run func(t *testing.T, c *cluster, l *load) string
}

func scenarios() []scenario {
	return []scenario{
		{id: "1-worker-sigkill", title: "worker SIGKILL mid-stream", run: workerKill},
		{id: "2-api-sigkill", title: "api SIGKILL during a burst", run: apiKill},
		{id: "3-redis-sigterm", title: "Redis SIGTERM + restart (AOF)", run: redisFault("SIGTERM")},
		// appendfsync always: with everysec, Redis postpones its AOF write
		// (for up to 2 s) while a background fsync is slow, and still
		// answers, so a SIGKILL on a busy disk can lose acknowledged jobs;
		// always writes and syncs before answering (see operations.md,
		// "The durability window").
		{id: "4-redis-sigkill", title: "Redis SIGKILL + restart (AOF, appendfsync always)", run: redisFault("SIGKILL"),
			opts: clusterOpts{RedisArgs: []string{"--appendfsync", "always"}}},
		{id: "5-redis-sigstop", title: "Redis SIGSTOP, then SIGCONT", run: redisFault("SIGSTOP")},
		{id: "6-upstream-down", title: "upstream killed, restarted on its port", run: upstreamDown},
		{id: "7-worker-sigterm", title: "worker SIGTERM (graceful) during long streams",
			opts: clusterOpts{WorkerShutdown: pick(3*time.Second, 5*time.Second)}, run: workerTerm},
	}
}

func secs(d time.Duration) string {
	if d < time.Second {
		return fmt.Sprintf("%d ms", d.Milliseconds())
	}
	return fmt.Sprintf("%.1f s", d.Seconds())
}

// workerKill: jobs stream multi-second answers; worker 1 is SIGKILLed a
// second into its calls and a new worker started a second later. The dead
// worker's calls come back when their leases run out and run again.
func workerKill(t *testing.T, c *cluster, l *load) string {
	n, reply := pick(40, 200), pick(60, 100) // 3 s and 5 s answers
	start := time.Now()
	l.burst(n, 16, func(int) int { return reply })
	victim := c.workers[0]
	var inFlight int
	if !waitFor(30*time.Second, func() bool { inFlight = c.workerInFlight(victim); return inFlight >= 3 }) {
		t.Fatalf("worker-1 never had 3 calls in flight (%d)", inFlight)
	}
	time.Sleep(time.Second) // into the streams
	inFlight = c.workerInFlight(victim)
	at := time.Since(start)
	victim.Kill(t)
	time.Sleep(time.Second)
	c.restartWorker(0)
	return fmt.Sprintf("%d jobs of %d-token (%s) answers; worker-1 SIGKILLed at %s with %d calls in flight, a new worker started 1 s later",
		n, reply, secs(time.Duration(reply)*time.Second/20), secs(at), inFlight)
}

// apiKill: a burst of requests from concurrent clients, each with its
// Idempotency-Key; the api is SIGKILLed a third of the way through and a
// new api started (on a new port) to which the clients switch; they retry
// on connection errors and 5xx with the same key.
func apiKill(t *testing.T, c *cluster, l *load) string {
	n, clients := pick(120, 500), pick(16, 32)
	third := l.whenAccepted(n / 3)
	done := make(chan struct{})
	start := time.Now()
	go func() { defer close(done); l.burst(n, clients, func(int) int { return 20 }) }()
	select {
	case <-third:
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("a third of the burst was not accepted within 60 s")
	}
	old := c.apiProc()
	old.Kill(t)
	at, acc := time.Since(start), len(l.accepted())
	api := c.startSluice("api")
	base := api.BaseURL(t)
	c.setAPI(api, base)
	back := time.Since(start) - at
	<-done
	return fmt.Sprintf("%d requests from %d clients; api SIGKILLed at %s with %d accepted; a new api took over %s later on a new port",
		n, clients, secs(at), acc, secs(back))
}

// redisFault: a steady load of 2-second answers; mid-load Redis gets
// SIGTERM (then is restarted on its port and folder), SIGKILL (restarted
// from its AOF) or SIGSTOP (then SIGCONT).
func redisFault(kind string) func(t *testing.T, c *cluster, l *load) string {
	return func(t *testing.T, c *cluster, l *load) string {
		rate, dur, at := pick(6.0, 10.0), pick(14*time.Second, 45*time.Second), pick(4*time.Second, 10*time.Second)
		down := pick(3*time.Second, 10*time.Second)
		if kind == "SIGSTOP" {
			down = pick(5*time.Second, 20*time.Second)
		}
		sent := make(chan struct{})
		start := time.Now()
		go func() { defer close(sent); l.steady(rate, dur, func(int) int { return 40 }) }()
		time.Sleep(at) // the fault's moment in the load, not a wait for work
		inFlight := c.fakeInFlight()
		faultAt := time.Since(start)
		var what string
		switch kind {
		case "SIGTERM":
			took := c.redis.Terminate(t)
			what = fmt.Sprintf("Redis SIGTERMed at %s (exited in %s), down %s, restarted on its port and folder", secs(faultAt), secs(took), secs(down))
		case "SIGKILL":
			c.redis.Kill(t)
			what = fmt.Sprintf("Redis SIGKILLed at %s, down %s, restarted from its AOF", secs(faultAt), secs(down))
		case "SIGSTOP":
			c.redis.Pause(t)
			what = fmt.Sprintf("Redis SIGSTOPped at %s for %s, then SIGCONT", secs(faultAt), secs(down))
		}
		time.Sleep(down) // the fault's length
		healed := time.Now()
		if kind == "SIGSTOP" {
			c.redis.Resume(t)
		} else {
			c.redis.Revive(t)
		}
		<-sent
		l.wait()
		first := l.firstAcceptedAfter(healed)
		again := "no 202 after it"
		if !first.IsZero() {
			again = "first 202 " + secs(first.Sub(healed)) + " after it"
		}
		return fmt.Sprintf("%.0f jobs/s for %s (2 s answers); %s; %d upstream calls in flight at the fault; %s",
			rate, secs(dur), what, inFlight, again)
	}
}

// upstreamDown: a steady load of 2-second answers; the upstream's process
// is SIGKILLed mid-load and started again on the same port after a while.
func upstreamDown(t *testing.T, c *cluster, l *load) string {
	rate, dur, at, down := pick(6.0, 10.0), pick(16*time.Second, 50*time.Second), pick(4*time.Second, 10*time.Second), pick(8*time.Second, 30*time.Second)
	sent := make(chan struct{})
	start := time.Now()
	go func() { defer close(sent); l.steady(rate, dur, func(int) int { return 40 }) }()
	time.Sleep(at) // the fault's moment in the load
	inFlight := c.fakeInFlight()
	faultAt := time.Since(start)
	c.fake.Kill(t)
	time.Sleep(down) // the outage's length
	c.startFake()
	back := time.Now()
	<-sent
	l.wait()
	l.settle(pick(2*time.Minute, 6*time.Minute))
	var first time.Time
	for _, j := range l.accepted() {
		if f := j.final; f != nil && f.FinishedAt != nil && f.FinishedAt.After(back) && (first.IsZero() || f.FinishedAt.Before(first)) {
			first = *f.FinishedAt
		}
	}
	again := "no job finished after it"
	if !first.IsZero() {
		again = "first job finished " + secs(first.Sub(back)) + " after it"
	}
	return fmt.Sprintf("%.0f jobs/s for %s (2 s answers); upstream SIGKILLed at %s with %d calls in flight, restarted on its port %s later; %s",
		rate, secs(dur), secs(faultAt), inFlight, secs(down), again)
}

// workerTerm: long streams (and some short ones) run; worker 1 gets
// SIGTERM: it lets calls run for worker.shutdown_timeout, then hands the
// rest back (worker_stopped) and exits; a new worker is started.
func workerTerm(t *testing.T, c *cluster, l *load) string {
	n, long := pick(30, 100), pick(160, 300) // 8 s and 15 s answers
	l.burst(n, 16, func(i int) int {
		if i%3 == 0 {
			return 30 // finishes within the grace
		}
		return long
	})
	victim := c.workers[0]
	var inFlight int
	if !waitFor(30*time.Second, func() bool { inFlight = c.workerInFlight(victim); return inFlight >= 3 }) {
		t.Fatalf("worker-1 never had 3 calls in flight (%d)", inFlight)
	}
	clean, took := victim.Stop(t, 60*time.Second)
	how := "exited by itself"
	if !clean {
		how = "had to be SIGKILLed after 60 s"
	}
	c.restartWorker(0)
	return fmt.Sprintf("%d jobs, two in three of %d-token (%s) answers; worker-1 SIGTERMed with %d calls in flight (shutdown_timeout %s), %s after %s; a new worker started",
		n, long, secs(time.Duration(long)*time.Second/20), inFlight, pick("3s", "5s"), how, secs(took))
}

var (
	rowsMu sync.Mutex
	rows   = map[string]*result{}
)

func TestChaos(t *testing.T) {
	all := scenarios()
	proctest.SluiceBinary(t) // built once, before the clocks start
	t.Run("scenario", func(t *testing.T) {
		for _, sc := range all {
			t.Run(sc.id, func(t *testing.T) {
				t.Parallel()
				r := &result{name: sc.title}
				rowsMu.Lock()
				rows[sc.id] = r
				rowsMu.Unlock()
				start := time.Now()
				defer func() { r.took = time.Since(start) }()
				c := startCluster(t, sc.id, sc.opts)
				t.Cleanup(func() {
					if t.Failed() {
						t.Logf("process logs, configuration and upstream journal: %s", c.dir)
					}
				})
				l := newLoad(t, c, sc.id, pick(3*time.Minute, 10*time.Minute))
				r.fault = sc.run(t, c, l)
				l.wait()
				l.settle(pick(2*time.Minute, 8*time.Minute))
				l.count(t, r)
				c.logNotes(t, r)
				r.done = true
			})
		}
	})
	table := renderTable(all)
	size := pick("short", "full")
	path := filepath.Join(artifactsDir(t), "results-"+size+".md")
	if err := os.WriteFile(path, []byte(table), 0o644); err != nil {
		t.Log(err)
	}
	if testing.Verbose() {
		fmt.Printf("\n%s\n(also in %s)\n", table, path)
	} else {
		t.Logf("\n%s", table)
	}
}

// renderTable is the Markdown table of the results, then one note per
// scenario.
func renderTable(all []scenario) string {
	rowsMu.Lock()
	defer rowsMu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "Chaos suite, %s size, %s. Each scenario: its own redis-server (AOF, appendfsync everysec unless the scenario says otherwise), fake upstream, "+
		"1 api and 2 workers; max_concurrency 24, worker.lease_ttl %s, 20 users, every job its own prompt and Idempotency-Key.\n\n",
		pick("short", "full"), time.Now().UTC().Format("2006-01-02 15:04 MST"), *leaseTTL)
	b.WriteString("| scenario | accepted | succeeded | failed | lost | duplicate complete upstream calls | 5xx (not 503) | 503 | expected | result | time |\n")
	b.WriteString("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |\n")
	for _, sc := range all {
		r := rows[sc.id]
		if r == nil {
			continue
		}
		res := "ok"
		switch {
		case !r.done:
			res = "**did not finish**"
		case len(r.misses) > 0:
			res = "**MISS**"
		}
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %d | %d | %d | %d | failed %d, lost 0, duplicates 0, 5xx 0 | %s | %.0f s |\n",
			r.name, r.accepted, r.succeeded, r.failed, r.lost, r.dup, r.fiveXX, r.five03, r.wantFailed, res, r.took.Seconds())
	}
	b.WriteString("\n")
	for i, sc := range all {
		r := rows[sc.id]
		if r == nil {
			continue
		}
		fmt.Fprintf(&b, "%d. **%s**: %s.", i+1, r.name, r.fault)
		if len(r.notes) > 0 {
			fmt.Fprintf(&b, " %s.", strings.Join(r.notes, "; "))
		}
		for _, m := range r.misses {
			fmt.Fprintf(&b, " MISS: %s.", m)
		}
		b.WriteString("\n")
	}
	return b.String()
}

var retryReason = regexp.MustCompile(`msg="attempt failed; retrying" reason=(\S+)`)

// logNotes summarizes the processes' logs: retries by reason, answers not
// kept, errors; a panic is a miss.
func (c *cluster) logNotes(t *testing.T, r *result) {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(c.dir, "*.log"))
	reasons := map[string]int{}
	counted := map[string]int{}
	needles := []string{
		"the answer is not kept",
		"Redis never took the answer",
		"lease taken back during the call",
		"level=ERROR",
		"panic:",
		"fatal error:",
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if m := retryReason.FindStringSubmatch(line); m != nil {
				reasons[m[1]]++
			}
			for _, n := range needles {
				if strings.Contains(line, n) {
					counted[n]++
				}
			}
		}
	}
	if len(reasons) > 0 {
		var s []string
		for k, n := range reasons {
			s = append(s, fmt.Sprintf("%s×%d", k, n))
		}
		sort.Strings(s)
		r.notes = append(r.notes, "worker retries "+strings.Join(s, " "))
	}
	for _, n := range needles[:4] {
		if counted[n] > 0 {
			r.notes = append(r.notes, fmt.Sprintf("%d log lines %q", counted[n], n))
		}
	}
	for _, n := range needles[4:] {
		if counted[n] > 0 {
			r.misses = append(r.misses, fmt.Sprintf("%d log lines %q (see %s)", counted[n], n, c.dir))
			t.Errorf("%d log lines %q in %s", counted[n], n, c.dir)
		}
	}
}
