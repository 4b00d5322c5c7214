package scheduler_test

import (
	"context"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// syllabus is a cacheable prefix of 6,000 tokens with the default TTL.
var syllabus = scheduler.CachePrefix{Hash: "5f1c0ffee5f1c0ffee5f1c0ffee5f1c0", Tokens: 6000, TTL: 5 * time.Minute}

// admitCached queues a job of in input tokens (prefixes included) for user
// and returns its id.
func (e *env) admitCached(t *testing.T, user string, in int, policy config.UserPolicy, ps ...scheduler.CachePrefix) string {
	t.Helper()
	return e.admitCachedClass(t, user, "", in, policy, ps...)
}

// admitCachedClass is admitCached for a job of service class class ("" =
// the default).
func (e *env) admitCachedClass(t *testing.T, user, class string, in int, policy config.UserPolicy, ps ...scheduler.CachePrefix) string {
	t.Helper()
	j := &jobs.Job{ID: jobs.NewID(e.g.Name), Tenant: "t", UserID: user, Model: "m", Group: e.g.Name,
		MaxTokens: 100, Request: []byte(`{}`), CreatedAt: e.clk.Now(), Class: class}
	if policy.Weight == 0 {
		policy.Weight = 1
	}
	res, err := e.s.Admit(context.Background(), scheduler.Admission{Job: j, Group: e.g, InputEstimate: in, CachePrefixes: ps, Policy: policy})
	if err != nil || res.Outcome != scheduler.Admitted {
		t.Fatalf("admit: %v %+v", err, res)
	}
	return j.ID
}

func (e *env) began(t *testing.T, id string, u scheduler.CacheUsage) int {
	t.Helper()
	n, err := e.s.CacheBegan(context.Background(), e.g, id, u)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func ids(r scheduler.Result) []string {
	var out []string
	for _, p := range r.Jobs {
		out = append(out, p.JobID)
	}
	return out
}

// cacheGroup has ample limits; its input bucket holds 95,000 tokens.
func cacheGroup() config.ModelGroup {
	return config.ModelGroup{RPM: 100000, InputTPM: 100000, OutputTPM: 1000000, CacheHold: 10 * time.Second}
}

// The first job with a prefix nobody has cached reserves all its input and
// becomes the prefix's writer; a second job with the prefix is held until
// the first one's answer begins, then reserves only its uncached input.
func TestCacheHoldThenReadReservesUncachedInputOnly(t *testing.T) {
	e := newEnv(t, cacheGroup())
	a := e.admitCached(t, "ann", 7000, config.UserPolicy{}, syllabus)
	if r := e.dispatch(t, 10); len(r.Jobs) != 1 || r.Jobs[0].JobID != a {
		t.Fatalf("first dispatch: %+v", r)
	}
	if l := e.levels(t); !near(l.Input, 95000-7000) {
		t.Fatalf("input level %v after the writer's dispatch, want %v (all of it: the prefix is written)", l.Input, 95000-7000)
	}
	b := e.admitCached(t, "bob", 7000, config.UserPolicy{}, syllabus)
	r := e.dispatch(t, 10)
	if len(r.Jobs) != 0 || r.State != scheduler.Hold || r.Wait != 10*time.Second {
		t.Fatalf("a job sharing the prefix being written: %+v, want held for 10s", r)
	}
	if st, err := e.s.CacheStats(context.Background(), e.g.Name); err != nil || st.Held != 1 {
		t.Fatalf("cache stats: %+v %v, want 1 held", st, err)
	}
	if n := e.began(t, a, scheduler.CacheUsage{Input: 1000, CacheCreation: 6000}); n != 1 {
		t.Fatalf("the writer's answer began: %d holds ended, want 1", n)
	}
	if r := e.dispatch(t, 10); len(r.Jobs) != 1 || r.Jobs[0].JobID != b {
		t.Fatalf("after the write: %+v", r)
	}
	if l := e.levels(t); !near(l.Input, 95000-7000-1000) {
		t.Fatalf("input level %v, want %v: a cache read reserves the uncached 1,000 only", l.Input, 95000-8000)
	}
	st, err := e.s.CacheStats(context.Background(), e.g.Name)
	if err != nil || st.InputTokens != 7000 || st.CacheCreation != 6000 || st.Held != 0 {
		t.Fatalf("cache stats %+v %v", st, err)
	}
}

// A held job keeps its place in line while jobs behind it that share no
// prefix go ahead.
func TestHeldJobKeepsItsPlace(t *testing.T) {
	e := newEnv(t, cacheGroup())
	a := e.admitCached(t, "ann", 7000, config.UserPolicy{}, syllabus)
	b := e.admitCached(t, "bob", 7000, config.UserPolicy{}, syllabus)
	c := e.admitCached(t, "cat", 50, config.UserPolicy{})
	r := e.dispatch(t, 10)
	if got := ids(r); len(got) != 2 || got[0] != a || got[1] != c || r.State != scheduler.Hold {
		t.Fatalf("dispatched %v (%s), want ann's and cat's with bob's held", got, r.State)
	}
	job, err := e.store.Get(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	pos, _, queued, err := e.s.Position(context.Background(), job, e.g)
	if err != nil || !queued || pos != 1 {
		t.Fatalf("held job's position %d (queued %v, %v), want 1", pos, queued, err)
	}
}

// A hold ends at its time when the writer's answer never begins; then the
// prefix is not held for again for a while (a slow upstream cannot chain
// holds), and every job reserves all its input.
func TestCacheHoldEndsAtItsTime(t *testing.T) {
	e := newEnv(t, cacheGroup())
	e.admitCached(t, "ann", 7000, config.UserPolicy{}, syllabus)
	e.dispatch(t, 10)
	b := e.admitCached(t, "bob", 7000, config.UserPolicy{}, syllabus)
	c := e.admitCached(t, "cat", 7000, config.UserPolicy{}, syllabus)
	if r := e.dispatch(t, 10); len(r.Jobs) != 0 || r.State != scheduler.Hold {
		t.Fatalf("%+v", r)
	}
	e.clk.Advance(9999 * time.Millisecond)
	if r := e.dispatch(t, 10); len(r.Jobs) != 0 || r.Wait != time.Millisecond {
		t.Fatalf("a millisecond before the hold's end: %+v", r)
	}
	e.clk.Advance(time.Millisecond)
	if got := ids(e.dispatch(t, 10)); len(got) != 2 || got[0] != b || got[1] != c {
		t.Fatalf("at the hold's end: dispatched %v, want bob's and cat's", got)
	}
	d := e.admitCached(t, "dan", 7000, config.UserPolicy{}, syllabus)
	if got := ids(e.dispatch(t, 10)); len(got) != 1 || got[0] != d {
		t.Fatalf("after a hold in vain: %v, want dan's at once", got)
	}
}

// A writer whose call fails before its answer begins releases the jobs
// held for it: the next becomes the writer, so the prefix is still written
// once.
func TestCacheHoldReleasedWhenTheWriterFails(t *testing.T) {
	e := newEnv(t, cacheGroup())
	a := e.admitCached(t, "ann", 7000, config.UserPolicy{}, syllabus)
	e.dispatch(t, 10)
	b := e.admitCached(t, "bob", 7000, config.UserPolicy{}, syllabus)
	e.admitCached(t, "cat", 7000, config.UserPolicy{}, syllabus)
	if r := e.dispatch(t, 10); len(r.Jobs) != 0 {
		t.Fatalf("%+v", r)
	}
	// Another job's release ends nothing.
	if n, err := e.s.CacheReleased(context.Background(), e.g, b); err != nil || n != 0 {
		t.Fatalf("release by a job that writes nothing: %d %v", n, err)
	}
	if n, err := e.s.CacheReleased(context.Background(), e.g, a); err != nil || n != 1 {
		t.Fatalf("release by the writer: %d %v", n, err)
	}
	r := e.dispatch(t, 10)
	if got := ids(r); len(got) != 1 || got[0] != b || r.State != scheduler.Hold {
		t.Fatalf("after the writer failed: %v (%s), want bob's as the new writer and cat's held", got, r.State)
	}
}

// An answer that neither read nor wrote the cache says the prefix is not
// cacheable (shorter than the upstream's minimum): nobody is held for it.
func TestUncacheablePrefixIsNotHeldFor(t *testing.T) {
	e := newEnv(t, cacheGroup())
	a := e.admitCached(t, "ann", 7000, config.UserPolicy{}, syllabus)
	e.dispatch(t, 10)
	b := e.admitCached(t, "bob", 7000, config.UserPolicy{}, syllabus)
	e.began(t, a, scheduler.CacheUsage{Input: 7000})
	c := e.admitCached(t, "cat", 7000, config.UserPolicy{}, syllabus)
	if got := ids(e.dispatch(t, 10)); len(got) != 2 || got[0] != b || got[1] != c {
		t.Fatalf("dispatched %v, want bob's and cat's at once", got)
	}
	if l := e.levels(t); !near(l.Input, 95000-3*7000) {
		t.Fatalf("input level %v, want %v: nothing is read from a cache", l.Input, 95000-21000)
	}
}

// With the hold off, jobs sharing an unwritten prefix go at once; a group
// whose input limit counts cache reads reserves all input even when cached;
// and the user's token quota is charged the uncached input once the prefix
// is cached.
func TestCacheWithoutHoldCountReadsAndQuota(t *testing.T) {
	g := cacheGroup()
	g.CacheHold = 0
	e := newEnv(t, g)
	a := e.admitCached(t, "ann", 7000, config.UserPolicy{}, syllabus)
	e.admitCached(t, "bob", 7000, config.UserPolicy{}, syllabus)
	if r := e.dispatch(t, 10); len(r.Jobs) != 2 {
		t.Fatalf("hold off: %+v", r)
	}
	e.began(t, a, scheduler.CacheUsage{Input: 1000, CacheCreation: 6000})
	quota := config.UserPolicy{TokensPerHour: 100000}
	e.admitCached(t, "cat", 7000, quota, syllabus)
	_, tok, err := e.s.Quotas(context.Background(), "t", "cat", quota)
	if err != nil || tok.Remaining != 100000-1000-100 {
		t.Fatalf("cat's token quota %+v %v, want %d remaining (uncached input + max_tokens)", tok, err, 100000-1100)
	}

	g = cacheGroup()
	g.Name, g.CountCacheReads = "reads", true
	e2 := newEnv(t, g)
	a = e2.admitCached(t, "ann", 7000, config.UserPolicy{}, syllabus)
	e2.dispatch(t, 10)
	e2.began(t, a, scheduler.CacheUsage{Input: 1000, CacheCreation: 6000})
	e2.admitCached(t, "bob", 7000, config.UserPolicy{}, syllabus)
	e2.dispatch(t, 10)
	if l := e2.levels(t); !near(l.Input, 95000-2*7000) {
		t.Fatalf("count_cache_reads: input level %v, want %v", l.Input, 95000-14000)
	}
}
