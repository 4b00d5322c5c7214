package worker_test

// Key loss: on a Redis with an eviction policy (allkeys-lru), or after a
// careless DEL, any key may vanish. Nothing a missing key does may wedge
// sluice: dispatch goes on, every job whose own record is left ends, no
// script error repeats, and the derived structures heal.
//
// The keys sluice keeps (package internal/rkeys names them all), for model
// group <g> (its hash tag <T> = rkeys.Tag(g), sluice:{<T>}: written gp
// below), tenant <t>, user <u>, job <id>:
//
//	fair queue (scheduler/scheduler.go, type keys):
//	  sluice:{T}:fq:<g>:order         zset   member "seq|id" → start tag
//	  sluice:{T}:fq:<g>:costs         hash   member → "input,output" estimate
//	  sluice:{T}:fq:<g>:totals        hash   n, in, out of the queued jobs (etas)
//	  sluice:{T}:fq:<g>:delayed       zset   member → when its retry is due
//	  sluice:{T}:fq:<g>:delayed_tags  hash   member → "tag;input,output"
//	  sluice:{T}:fq:<g>:vtime         string V, the start tag of the last interactive dispatch
//	  sluice:{T}:fq:<g>:vtime_b       string V_b, the same for background jobs
//	  sluice:{T}:fq:<g>:finish        zset   user key (+ "\0b" for background) → finish tag
//	  sluice:{T}:fq:<g>:deadlines     zset   member → deadline ms
//	  sluice:{T}:fq:<g>:expiring      zset   id → when it was found past its deadline
//	  sluice:{T}:fq:<g>:seq           string the queue's arrival counter
//	  sluice:{T}:fq:<g>:dispatching   zset   "id|dispatch" picked, not yet handed to asynq
//	  sluice:{T}:fq:<g>:dispatch_seq  string the dispatch counter
//	  sluice:{T}:fq:<g>:rate          hash   dispatches and settled tokens per minute
//	  sluice:{T}:fq:<g>:users         hash   user key → queued jobs (jobs.WaitingUsersKey)
//	  sluice:{T}:live:<g>             hash   id → status initial and user key of every
//	                                         job admitted and not ended (the sweep's net)
//	limiter:
//	  sluice:{T}:lim:<g>              hash   buckets, freeze, pace, outage state
//	  sluice:{T}:lim:<g>:res          hash   id → "requests,input,output" reserved
//	  sluice:{T}:lim:<g>:leases       zset   id → lease end (concurrency slots)
//	  sluice:{T}:lim:<g>:seen         hash   the upstream's last rate-limit headers
//	per job (jobs/store.go, jobs/followers.go; <T> is in the id):
//	  sluice:{T}:job:<id>             hash   the record
//	  sluice:{T}:job:<id>:events      stream its event log (the first event is in the record)
//	  sluice:{T}:job:<id>:follow      its followers across api processes
//	per user and tenant:
//	  sluice:{u…}:quota:<t>:<len>:<u> hash   request and token quota buckets
//	  sluice:{T}:user:<t>:<u>:counts  hash   queued, running
//	  sluice:{T}:user:<t>:<u>:jobs    zset   the user's jobs (listing)
//	  sluice:{T}:tenant:<t>:jobs      zset   the tenant's jobs (listing)
//	  sluice:{T}:idem:<t>:<len>:<u>:<key>    an Idempotency-Key's job
//	usage (usage/usage.go):
//	  sluice:{T}:usage:<t>:{h|d}:<time>[:users|:ureq], sluice:usage:… (no group)
//	elsewhere:
//	  sluice:estimate:ratio       hash   model → token estimate calibration
//	  sluice:token_secret         string the fleet's job-token secret
//	  asynq:*                     asynq's queues, tasks and servers
//	(sluice:wake:<g>, sluice:moved:<g>, sluice:cancel and sluice:jobev:<id>
//	are Pub/Sub channels, not keys.)

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/tasks"
)

const (
	klJobs     = 30
	klUsers    = 5
	klDeadline = 120 // seconds: a deadline no job reaches (so deadlines has entries)
	klWithin   = 40 * time.Second
)

// klEnv is one scenario's running sluice and the jobs it was given.
type klEnv struct {
	*harness.Env
	ids    []string
	tokens map[string]string
	short  map[string]bool // jobs with a deadline meant to pass while queued
	lost   map[string]bool // jobs whose own record the scenario deleted
}

type keyLossCase struct {
	name string
	// patterns are deleted with SCAN MATCH (group "sonnet", tenant "acme").
	patterns []string
	// keys, if set, names exact keys to delete instead (and may record lost jobs).
	keys func(t *testing.T, e *klEnv) []string
	// ready, if set, is what to wait for before deleting (default: a
	// backlog with calls running).
	ready func(e *klEnv) bool
	// retries: the first calls get 429s with a 2 s retry-after, so jobs
	// wait to retry when the keys go.
	retries bool
	// expiring: no worker runs until the keys are gone; some jobs' short
	// deadlines pass first and a dispatch round moves them to the
	// expiring set (which the scenario deletes).
	expiring bool
	// handed: no worker runs until the keys are gone; a dispatcher alone
	// hands jobs to asynq first (their tasks wait in asynq's queue, and
	// the jobs hold leases).
	handed bool
	// slow: the first jobs' calls outlast a lease heartbeat (the keys go
	// while they run).
	slow        bool
	tenantExtra string
	// repeat deletes the keys again after every job ended (then check).
	repeat bool
	// check runs after every job ended.
	check func(t *testing.T, e *klEnv)
}

// gp starts every key of the group the key-loss tests use.
var gp = "sluice:{" + rkeys.Tag("sonnet") + "}:"

func TestKeyLoss(t *testing.T) {
	fq := func(sub string) keyLossCase {
		return keyLossCase{name: "fq " + sub, patterns: []string{gp + "fq:sonnet:" + sub}}
	}
	lim := func(name, pattern string) keyLossCase {
		return keyLossCase{name: name, patterns: []string{pattern}}
	}
	cases := []keyLossCase{
		fq("order"),
		// The operator's report: with the costs gone, fq_leave sent
		// HINCRBY … -0 and every dispatch failed from then on.
		fq("costs"),
		fq("totals"),
		withRetries(fq("delayed")),
		withRetries(fq("delayed_tags")),
		fq("vtime"),
		fq("vtime_b"),
		fq("finish"),
		fq("deadlines"),
		{name: "fq expiring", patterns: []string{gp + "fq:sonnet:expiring"}, expiring: true},
		fq("seq"),
		fq("dispatching"),
		fq("dispatch_seq"),
		fq("rate"),
		fq("users"),
		{name: "fq all", patterns: []string{gp + "fq:sonnet:*"}},
		{name: "live jobs", patterns: []string{gp + "live:sonnet"}},
		{name: "fq and limiter all", patterns: []string{gp + "fq:sonnet:*", gp + "lim:sonnet*"}, slow: true},
		lim("limiter", gp+"lim:sonnet"),
		lim("limiter reservations", gp+"lim:sonnet:res"),
		slowly(lim("limiter leases", gp+"lim:sonnet:leases")),
		lim("limiter seen", gp+"lim:sonnet:seen"),
		{name: "user quotas", patterns: []string{"sluice:{u*}:quota:*"},
			tenantExtra: "    requests_per_hour: 1000\n    tokens_per_hour: 100000000\n"},
		{name: "user counts", patterns: []string{gp + "user:*:counts"}, tenantExtra: "    max_queued: 8\n"},
		{name: "job indexes", patterns: []string{gp + "user:*:jobs", gp + "tenant:*:jobs"}},
		{name: "usage statistics", patterns: []string{gp + "usage:*", "sluice:usage:*"}, check: func(t *testing.T, e *klEnv) {
			if resp, b := e.Do(t, http.MethodGet, "/v1/admin/usage", harness.AdminKey, nil); resp.StatusCode != http.StatusOK {
				t.Errorf("admin usage after its keys were lost: %d %s", resp.StatusCode, b)
			}
		}},
		{name: "estimate ratios", patterns: []string{"sluice:estimate:*"}},
		{name: "token secret", patterns: []string{"sluice:token_secret"}, check: checkTokenSecret},
		{name: "job records", keys: deleteSomeRecords, slow: true},
		{name: "job event streams", patterns: []string{"sluice:{*}:job:*:events"}, repeat: true, check: checkStreamsEnd},
		{name: "asynq", patterns: []string{"asynq:*"}},
		{name: "asynq with tasks waiting", patterns: []string{"asynq:*"}, handed: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			runKeyLoss(t, tc)
		})
	}
}

func slowly(c keyLossCase) keyLossCase {
	c.slow = true
	return c
}

func withRetries(c keyLossCase) keyLossCase {
	c.retries = true
	c.ready = func(e *klEnv) bool { return zcard(e, gp+"fq:sonnet:delayed") > 0 }
	return c
}

func runKeyLoss(t *testing.T, tc keyLossCase) {
	ctx := context.Background()
	he := harness.Start(t, harness.Options{
		Fake:           fakeanthropic.Config{TokensPerSecond: 100},
		MaxConcurrency: 2,
		TenantExtra:    tc.tenantExtra,
		NoWorker:       tc.expiring || tc.handed,
		// Leases lost with asynq's tasks come back after one lease.
		ExtraConfig: "  lease_ttl: 2s\n",
	})
	e := &klEnv{Env: he, tokens: map[string]string{}, short: map[string]bool{}, lost: map[string]bool{}}
	if tc.retries {
		e.Fake.QueueFaults(
			fakeanthropic.FaultRule{Kind: fakeanthropic.FaultRateLimit, RetryAfter: 2 * time.Second},
			fakeanthropic.FaultRule{Kind: fakeanthropic.FaultRateLimit, RetryAfter: 2 * time.Second})
	}
	for i := range klJobs {
		reply := 15
		if tc.slow && i < 4 {
			reply = 200 // 2 s: the heartbeat renews the lease (every 2s/3) while it runs
		}
		body := harness.JobBody(fmt.Sprintf("kl-user-%d", i%klUsers), fmt.Sprintf("question %d [[reply_tokens=%d]]", i, reply))
		body["request"].(map[string]any)["max_tokens"] = reply
		if i%3 == 1 {
			body["class"] = "background" // both classes' structures are lost and heal
		}
		switch {
		case tc.expiring && i%6 == 0:
			body["deadline_seconds"] = 0.2
		case i%6 == 0:
			body["deadline_seconds"] = klDeadline
		}
		v := e.Submit(t, body)
		id := v.ID
		e.ids = append(e.ids, id)
		e.tokens[id] = v.Token
		if tc.expiring && i%6 == 0 {
			e.short[id] = true
		}
	}
	g := &e.Config.ModelGroups[0]
	switch {
	case tc.expiring:
		// A round that picks nothing moves the jobs past their deadline
		// to the expiring set.
		harness.Eventually(t, 10*time.Second, func() bool {
			r, err := e.Sched.Dispatch(ctx, g, 0)
			return err == nil && r.Expiring == len(e.short)
		}, "%d jobs to be found past their deadline", len(e.short))
	case tc.handed:
		ctx, stop := context.WithCancel(ctx)
		d := scheduler.NewDispatcher(scheduler.DispatcherDeps{Scheduler: e.Sched, Redis: e.RDB,
			Groups: e.Config.ModelGroups, Enqueuer: asynq.NewClientFromRedisClient(e.RDB),
			Task: tasks.RunJobOptions{MaxRetry: 3}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		done := make(chan struct{})
		go func() { defer close(done); _ = d.Run(ctx) }()
		harness.Eventually(t, 10*time.Second, func() bool {
			n, _ := e.RDB.LLen(context.Background(), "asynq:{"+tasks.Queue("sonnet")+"}:pending").Result()
			return n == int64(g.MaxConcurrency)
		}, "jobs handed to asynq")
		stop()
		<-done
	case tc.ready != nil:
		harness.Eventually(t, 10*time.Second, func() bool { return tc.ready(e) }, "the scenario's state before the keys go")
	default:
		harness.Eventually(t, 10*time.Second, func() bool {
			return zcard(e, gp+"fq:sonnet:order") >= 5 && zcard(e, gp+"lim:sonnet:leases") >= 1 &&
				(tc.name == "fq dispatching" || present(e, tc.patterns))
		}, "a backlog with calls running (and the keys to delete)")
	}

	n := deleteKeys(t, e, tc)
	if n == 0 && tc.name != "fq dispatching" {
		t.Fatalf("no key of the family existed: nothing was tested")
	}
	t.Logf("deleted %d keys", n)
	// Admission right after the loss: a sane place in line and eta.
	for i := range 2 {
		v := e.Submit(t, harness.JobBody(fmt.Sprintf("kl-user-%d", i), "during [[reply_tokens=5]]"))
		if v.Position == nil || *v.Position < 1 || v.ETASeconds == nil || *v.ETASeconds < 0 {
			t.Errorf("a job admitted after the loss: position %v, eta %v", v.Position, v.ETASeconds)
		}
		e.ids = append(e.ids, v.ID)
		e.tokens[v.ID] = v.Token
	}
	if tc.expiring || tc.handed {
		harness.StartWorker(t, e.Env)
	}

	waitEnded(t, e)
	if tc.repeat {
		deleteKeys(t, e, tc)
	}

	// Every job is where it should be: the api answers for it, with a
	// record, or 404 for a job whose record was deleted.
	for _, id := range e.ids {
		resp, b := e.Do(t, http.MethodGet, "/v1/jobs/"+id, harness.TenantKey, nil)
		if e.lost[id] {
			if resp.StatusCode != http.StatusNotFound {
				t.Errorf("job %s whose record was deleted: %d %s", id, resp.StatusCode, b)
			}
			continue
		}
		v := e.Get(t, id)
		want := jobs.Succeeded
		if e.short[id] {
			want = jobs.Expired
		}
		if v.Status != want {
			t.Errorf("job %s ended %s (%+v), want %s", id, v.Status, v.Error, want)
		}
	}
	checkClean(t, e)
	if tc.check != nil {
		tc.check(t, e)
	}

	// Dispatch goes on: new jobs run.
	var more []string
	for i := range 4 {
		more = append(more, e.Submit(t, harness.JobBody(fmt.Sprintf("kl-user-%d", i), "after [[reply_tokens=5]]")).ID)
	}
	for _, id := range more {
		if v := e.WaitTerminal(t, id, klWithin); v.Status != jobs.Succeeded {
			t.Errorf("job %s submitted after the loss ended %s (%+v)", id, v.Status, v.Error)
		}
	}
	checkLogs(t, e)
}

// deleteKeys deletes the scenario's keys and returns how many existed.
func deleteKeys(t *testing.T, e *klEnv, tc keyLossCase) int {
	t.Helper()
	ctx := context.Background()
	var keys []string
	if tc.keys != nil {
		keys = tc.keys(t, e)
	}
	for _, p := range tc.patterns {
		iter := e.RDB.Scan(ctx, 0, p, 1000).Iterator()
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
		if err := iter.Err(); err != nil {
			t.Fatal(err)
		}
	}
	if len(keys) == 0 {
		return 0
	}
	n, err := e.RDB.Del(ctx, keys...).Result()
	if err != nil {
		t.Fatal(err)
	}
	return int(n)
}

// explained is a testing.TB whose Fatalf adds what detail says (the state
// a harness.Eventually gave up on).
type explained struct {
	testing.TB
	detail func() string
}

func (x explained) Fatalf(format string, args ...any) {
	x.TB.Helper()
	x.TB.Fatalf(format+"\n%s", append(args, x.detail())...)
}

// waitEnded waits until every job whose record is left has ended.
func waitEnded(t *testing.T, e *klEnv) {
	t.Helper()
	ctx := context.Background()
	var stuck []string
	tb := explained{t, func() string { return fmt.Sprintf("%d jobs never ended: %v\n%s", len(stuck), stuck, tail(e.Logs())) }}
	harness.Eventually(tb, klWithin, func() bool {
		stuck = stuck[:0]
		for _, id := range e.ids {
			j, err := e.Store.Get(ctx, id)
			if err == jobs.ErrNotFound && e.lost[id] {
				continue
			}
			if err != nil || !j.Status.Terminal() {
				s := "error"
				if err == nil {
					s = string(j.Status)
				}
				stuck = append(stuck, id+" "+s)
			}
		}
		return len(stuck) == 0
	}, "every job to end")
}

// checkClean: once every job ended, the group's structures are empty and
// consistent again (counts floored at 0, not negative).
func checkClean(t *testing.T, e *klEnv) {
	t.Helper()
	ctx := context.Background()
	var dirty []string
	check := func() bool {
		dirty = dirty[:0]
		for _, k := range []string{"order", "delayed", "deadlines", "expiring", "dispatching"} {
			if n := zcard(e, gp+"fq:sonnet:"+k); n != 0 {
				dirty = append(dirty, fmt.Sprintf("%s has %d", k, n))
			}
		}
		for _, k := range []string{gp + "fq:sonnet:costs", gp + "fq:sonnet:delayed_tags", gp + "fq:sonnet:users",
			gp + "lim:sonnet:res", gp + "live:sonnet"} {
			if n, _ := e.RDB.HLen(ctx, k).Result(); n != 0 {
				dirty = append(dirty, fmt.Sprintf("%s has %d", k, n))
			}
		}
		if n := zcard(e, gp+"lim:sonnet:leases"); n != 0 {
			dirty = append(dirty, fmt.Sprintf("leases has %d", n))
		}
		tot, _ := e.RDB.HMGet(ctx, gp+"fq:sonnet:totals", "n", "in", "out").Result()
		for i, v := range tot {
			if v != nil && v != "0" {
				dirty = append(dirty, fmt.Sprintf("totals %d is %v", i, v))
			}
		}
		for u := range klUsers {
			c, _ := e.RDB.HMGet(ctx, jobs.CountsKey("sonnet", "acme", fmt.Sprintf("kl-user-%d", u)), "queued", "running").Result()
			for i, v := range c {
				if v == nil || v == "0" {
					continue
				}
				dirty = append(dirty, fmt.Sprintf("user %d count %d is %v", u, i, v))
			}
		}
		return len(dirty) == 0
	}
	tb := explained{t, func() string { return fmt.Sprintf("still: %v", dirty) }}
	harness.Eventually(tb, 10*time.Second, check, "the queue's structures to be clean after every job ended")
}

// scriptError matches what a failing script leaves in a log line.
var scriptError = regexp.MustCompile(`\bERR\b|user_script|Error running script|not an integer|attempt to`)

// checkLogs: no script error (nor any Redis ERR) was logged.
func checkLogs(t *testing.T, e *klEnv) {
	t.Helper()
	var bad []string
	for _, line := range strings.Split(e.Logs(), "\n") {
		if scriptError.MatchString(line) {
			bad = append(bad, line)
		}
	}
	if len(bad) > 0 {
		if len(bad) > 20 {
			bad = bad[:20]
		}
		t.Errorf("script errors were logged:\n%s", strings.Join(bad, "\n"))
	}
}

// present reports whether a key matches one of the patterns.
func present(e *klEnv, patterns []string) bool {
	ctx := context.Background()
	for _, p := range patterns {
		iter := e.RDB.Scan(ctx, 0, p, 1000).Iterator()
		if iter.Next(ctx) {
			return true
		}
	}
	return len(patterns) == 0
}

func zcard(e *klEnv, key string) int64 {
	n, _ := e.RDB.ZCard(context.Background(), key).Result()
	return n
}

// deleteSomeRecords picks the records of three jobs still waiting and of
// one running (or just ended) job: those jobs are lost, the others not.
func deleteSomeRecords(t *testing.T, e *klEnv) []string {
	ctx := context.Background()
	var keys []string
	queued, running := 0, 0
	for _, id := range e.ids {
		j, err := e.Store.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case j.Status == jobs.Queued && j.Dispatch == 0 && queued < 3:
			queued++
		case j.Status == jobs.Running && running < 1:
			running++
		default:
			continue
		}
		e.lost[id] = true
		keys = append(keys, jobs.Key(id))
	}
	if queued < 3 || running < 1 {
		t.Fatalf("only %d queued and %d running jobs to lose", queued, running)
	}
	return keys
}

// checkTokenSecret: the running api still knows the secret, and a job's
// token still opens it on an api started after the loss (which made a new
// secret: records keep the token's hash, not the secret).
func checkTokenSecret(t *testing.T, e *klEnv) {
	// A job submitted before the loss and one after (to the api that
	// still holds the old secret), each read with its token on that api
	// and on one started after the loss.
	sub := e.Submit(t, harness.JobBody("kl-user-0", "token [[reply_tokens=3]]"))
	e.WaitTerminal(t, sub.ID, klWithin)
	later := harness.StartAPI(t, e.Env)
	for _, j := range []struct{ id, token string }{{e.ids[0], e.tokens[e.ids[0]]}, {sub.ID, sub.Token}} {
		for _, base := range []string{e.API.URL, later.URL} {
			resp, err := http.Get(base + "/v1/jobs/" + j.id + "?token=" + j.token)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("job %s's token on %s after the secret was lost: %d", j.id, base, resp.StatusCode)
			}
		}
	}
	if s, err := e.RDB.Get(context.Background(), "sluice:token_secret").Result(); err != nil || s == "" {
		t.Errorf("the api started after the loss made no new secret: %v", err)
	}
}

// checkStreamsEnd: an ended job whose event log was lost still ends its
// event stream, with its terminal event rebuilt from the record.
func checkStreamsEnd(t *testing.T, e *klEnv) {
	for _, id := range e.ids[:3] {
		if n, _ := e.RDB.Exists(context.Background(), jobs.EventsKey(id)).Result(); n != 0 {
			t.Fatalf("the event log of %s is still there", id)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		evs := e.Events(t, ctx, id, harness.TenantKey, "")
		cancel()
		if len(evs) == 0 || evs[len(evs)-1].Event != string(jobs.Succeeded) {
			t.Errorf("job %s: the event stream of a job whose log was lost ended with %+v, want succeeded", id, evs)
		}
	}
}
