package scheduler_test

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// classEnv is env with the raw Redis client, to look at the fair order.
type classEnv struct {
	*env
	rdb *redis.Client
}

func newClassEnv(t *testing.T, g config.ModelGroup) classEnv {
	t.Helper()
	r := redistest.Start(t)
	rdb := r.Client(t)
	clk := harness.NewClock(time.Date(2026, 11, 29, 14, 0, 0, 0, time.UTC))
	store := jobs.NewStore(rdb, jobs.Options{})
	g.Name = "g"
	if g.Burst == 0 {
		g.Burst = time.Minute
	}
	if g.MaxConcurrency == 0 {
		g.MaxConcurrency = 1000
	}
	s := scheduler.New(rdb, store, scheduler.Options{Clock: clk.Now, LeaseTTL: time.Hour})
	return classEnv{env: &env{s: s, store: store, clk: clk, g: &g}, rdb: rdb}
}

// admitClass queues a job of class for user and returns it with its place.
func (e classEnv) admitClass(t *testing.T, user, class string, in int, weight float64) (string, scheduler.AdmitResult) {
	t.Helper()
	j := &jobs.Job{ID: jobs.NewID(e.g.Name), Tenant: "t", UserID: user, Model: "m", Group: e.g.Name,
		MaxTokens: 1, Request: []byte(`{}`), CreatedAt: e.clk.Now(), Class: class}
	res, err := e.s.Admit(context.Background(), scheduler.Admission{Job: j, Group: e.g, InputEstimate: in, Policy: config.UserPolicy{Weight: weight}})
	if err != nil || res.Outcome != scheduler.Admitted {
		t.Fatalf("admit: %+v %v", res, err)
	}
	return j.ID, res
}

func (e classEnv) job(t *testing.T, id string) *jobs.Job {
	t.Helper()
	j, err := e.store.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// score is the job's score in the fair order, as Redis keeps it (-1 when
// it is not there).
func (e classEnv) score(t *testing.T, id string) float64 {
	t.Helper()
	v, err := e.rdb.ZScore(context.Background(), rkeys.FQ(e.g.Name, "order"), e.job(t, id).FQMember).Result()
	if err == redis.Nil {
		return -1
	}
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// recordTag is the start tag the job's record keeps.
func (e classEnv) recordTag(t *testing.T, id string) float64 {
	t.Helper()
	f, err := strconv.ParseFloat(e.job(t, id).FQTag, 64)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

const bgBase = 1e15 // prelude.lua's BG

// A background backlog of 200 jobs does not delay interactive newcomers,
// even those of the users whose background jobs wait: each is dispatched
// within 2 dispatches of its arrival (by dispatch_seq).
func TestInteractiveNewcomersGoFirst(t *testing.T) {
	e := newClassEnv(t, config.ModelGroup{RPM: 1000000, InputTPM: 100000000, OutputTPM: 100000000, BackgroundMinShare: 0.1})
	ctx := context.Background()
	for i := range 200 {
		e.admitClass(t, []string{"x", "y"}[i%2], config.ClassBackground, 100, 1)
	}
	dispatched := 0
	one := func() string {
		r := e.dispatch(t, 1)
		if len(r.Jobs) != 1 {
			t.Fatalf("dispatch: %+v", r)
		}
		dispatched++
		return r.Jobs[0].JobID
	}
	for range 30 {
		one()
	}
	for i := range 20 {
		// The newcomers are the backlog's own users: fair queuing alone
		// would put each behind its user's background jobs.
		id, res := e.admitClass(t, []string{"x", "y"}[i%2], config.ClassInteractive, 100, 1)
		if res.Position != 1 {
			t.Errorf("newcomer %d: position %d at admission, want 1", i, res.Position)
		}
		arrival := dispatched
		for e.job(t, id).DispatchSeq == 0 && dispatched < arrival+5 {
			one()
		}
		if seq := e.job(t, id).DispatchSeq; seq == 0 || seq > int64(arrival+2) {
			t.Fatalf("newcomer %d arrived after %d dispatches, dispatched as %d", i, arrival, seq)
		}
		// Background keeps going between arrivals.
		one()
		one()
	}
	if n, err := e.s.QueueLength(ctx, e.g.Name); err != nil || n != 200-30-40 {
		t.Fatalf("queue length %d %v", n, err)
	}
}

// With the request limit binding (one a second), background gets at least
// its minimum share of a minute's dispatches while interactive jobs also
// wait; with a share of 0 it gets none.
func TestBackgroundMinimumShare(t *testing.T) {
	for _, share := range []float64{0.1, 0.25, 0} {
		t.Run(fmt.Sprint(share), func(t *testing.T) {
			e := newClassEnv(t, config.ModelGroup{RPM: 60, InputTPM: 100000000, OutputTPM: 100000000, Burst: time.Second, BackgroundMinShare: share})
			bg := map[string]bool{}
			for i := range 100 {
				e.admitClass(t, []string{"a", "b"}[i%2], config.ClassInteractive, 10, 1)
				id, _ := e.admitClass(t, []string{"x", "y"}[i%2], config.ClassBackground, 10, 1)
				bg[id] = true
			}
			total, nbg := 0, 0
			for range 60 {
				e.clk.Advance(time.Second)
				for _, p := range e.dispatch(t, 10).Jobs {
					total++
					if bg[p.JobID] {
						nbg++
					}
				}
			}
			if total < 59 || total > 61 {
				t.Fatalf("%d dispatches in a minute at 60 RPM", total)
			}
			want := int(share * float64(total)) // at least
			if nbg < want || (share == 0 && nbg != 0) || nbg > want+1 {
				t.Fatalf("background got %d of %d dispatches, want %d (share %v)", nbg, total, want, share)
			}
		})
	}
}

// Within each class, users are served fairly: interactive users alternate
// first, then background users alternate.
func TestFairnessWithinEachClass(t *testing.T) {
	e := newClassEnv(t, config.ModelGroup{RPM: 1000000, InputTPM: 100000000, OutputTPM: 100000000})
	users := map[string]string{}
	for range 3 {
		id, _ := e.admitClass(t, "x", config.ClassBackground, 10, 1)
		users[id] = "x"
	}
	for range 3 {
		id, _ := e.admitClass(t, "a", config.ClassInteractive, 10, 1)
		users[id] = "a"
	}
	for range 3 {
		id, _ := e.admitClass(t, "y", config.ClassBackground, 10, 1)
		users[id] = "y"
	}
	for range 3 {
		id, _ := e.admitClass(t, "b", config.ClassInteractive, 10, 1)
		users[id] = "b"
	}
	var order []string
	for {
		r := e.dispatch(t, 1)
		if len(r.Jobs) == 0 {
			break
		}
		order = append(order, users[r.Jobs[0].JobID])
	}
	if diff := cmp.Diff("a b a b a b x y x y x y", strings.Join(order, " ")); diff != "" {
		t.Fatalf("dispatch order (-want +got):\n%s", diff)
	}
}

// A background job's position counts the background jobs ahead of it;
// its eta counts the interactive ones too. Interactive positions are as
// before.
func TestBackgroundPositions(t *testing.T) {
	e := newClassEnv(t, config.ModelGroup{RPM: 60, InputTPM: 100000000, OutputTPM: 100000000, Burst: time.Second, BackgroundMinShare: 0.1})
	ctx := context.Background()
	var inter, back []string
	for i := range 3 {
		id, res := e.admitClass(t, fmt.Sprint("i", i), config.ClassInteractive, 10, 1)
		if res.Position != i+1 {
			t.Errorf("interactive %d admitted at %d", i, res.Position)
		}
		inter = append(inter, id)
	}
	for i := range 2 {
		id, res := e.admitClass(t, fmt.Sprint("b", i), config.ClassBackground, 10, 1)
		if res.Position != i+1 || res.ETA < 3 {
			t.Errorf("background %d admitted at %d, eta %d (want position %d, eta at least the 3 interactive jobs' 3 s)", i, res.Position, res.ETA, i+1)
		}
		back = append(back, id)
	}
	// A later interactive job goes before every background job.
	id, res := e.admitClass(t, "i9", config.ClassInteractive, 10, 1)
	if res.Position != 4 {
		t.Errorf("late interactive admitted at %d", res.Position)
	}
	inter = append(inter, id)
	var ws []scheduler.Watched
	for _, id := range append(append([]string{}, inter...), back...) {
		ws = append(ws, scheduler.Watched{ID: id, Member: e.job(t, id).FQMember, Group: e.g})
	}
	places, err := e.s.Places(ctx, ws)
	if err != nil {
		t.Fatal(err)
	}
	var got []int
	for i, id := range append(append([]string{}, inter...), back...) {
		p, eta, ok, err := e.s.Position(ctx, e.job(t, id), e.g)
		if err != nil || !ok || p != places[i].Position || eta != places[i].ETASeconds {
			t.Fatalf("position of %s: %d %d %v %v; places %+v", id, p, eta, ok, err, places[i])
		}
		got = append(got, p)
	}
	if diff := cmp.Diff([]int{1, 2, 3, 4, 1, 2}, got); diff != "" {
		t.Fatalf("positions (-want +got):\n%s", diff)
	}
	if places[4].ETASeconds <= places[3].ETASeconds {
		t.Errorf("the first background job's eta %d is not after the last interactive one's %d", places[4].ETASeconds, places[3].ETASeconds)
	}
}

// A background job retried goes back at its original tag, exactly (its
// tag is above 2^49, where "%.14g" would lose digits), and so keeps its
// place before its user's later jobs.
func TestBackgroundRetryKeepsItsPlace(t *testing.T) {
	e := newClassEnv(t, config.ModelGroup{RPM: 1000000, InputTPM: 100000000, OutputTPM: 100000000})
	ctx := context.Background()
	// Weight 3 makes tags fractions that no short decimal holds.
	for range 5 {
		e.admitClass(t, "z", config.ClassBackground, 9, 3) // moves V_b on
	}
	for range 5 {
		e.dispatch(t, 1)
	}
	first, _ := e.admitClass(t, "x", config.ClassBackground, 9, 3)
	second, _ := e.admitClass(t, "x", config.ClassBackground, 9, 3)
	other, _ := e.admitClass(t, "y", config.ClassBackground, 9, 3)
	tag := e.score(t, first)
	if rt := e.recordTag(t, first); rt != tag || tag < bgBase || tag == math.Trunc(tag) {
		t.Fatalf("record's tag %v (%q), order's %v", rt, e.job(t, first).FQTag, tag)
	}
	r := e.dispatch(t, 1)
	if len(r.Jobs) != 1 || r.Jobs[0].JobID != first {
		t.Fatalf("dispatch: %+v", r)
	}
	a := scheduler.Attempt{Group: e.g, Job: e.job(t, first), Dispatch: r.Jobs[0].Dispatch}
	if _, err := e.s.Start(ctx, a, e.clk.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := e.s.Retry(ctx, scheduler.Retry{Attempt: a, Reason: "overloaded", Delay: time.Second}); err != nil {
		t.Fatal(err)
	}
	e.clk.Advance(2 * time.Second)
	// The round returns the due retry to the order and picks it first.
	r = e.dispatch(t, 1)
	if len(r.Jobs) != 1 || r.Jobs[0].JobID != first {
		t.Fatalf("after the retry: %+v, want %s first", r, first)
	}
	if got := e.recordTag(t, first); got != tag {
		t.Fatalf("tag after the retry %v, want %v", got, tag)
	}
	var order []string
	for range 2 {
		order = append(order, e.dispatch(t, 1).Jobs[0].JobID)
	}
	if diff := cmp.Diff([]string{other, second}, order); diff != "" {
		t.Fatalf("order after the retry (-want +got):\n%s", diff)
	}
}

// A lost order entry of a background job (the order alone: repair; the
// order and the costs: the sweep) is put back at the record's tag, in the
// background segment, behind the interactive jobs.
func TestLostBackgroundEntryReturnsToItsSegment(t *testing.T) {
	for _, lost := range [][]string{{"order"}, {"order", "costs", "totals"}} {
		t.Run(strings.Join(lost, "+"), func(t *testing.T) {
			e := newClassEnv(t, config.ModelGroup{RPM: 1000000, InputTPM: 100000000, OutputTPM: 100000000})
			ctx := context.Background()
			for range 3 {
				e.admitClass(t, "x", config.ClassBackground, 9, 3)
			}
			e.dispatch(t, 1)
			b, _ := e.admitClass(t, "x", config.ClassBackground, 9, 3)
			i, _ := e.admitClass(t, "a", config.ClassInteractive, 10, 1)
			bt, it := e.score(t, b), e.score(t, i)
			for _, k := range lost {
				if err := e.rdb.Del(ctx, rkeys.FQ(e.g.Name, k)).Err(); err != nil {
					t.Fatal(err)
				}
			}
			// The round puts both back, then picks the interactive one.
			if r := e.dispatch(t, 1); len(r.Jobs) != 1 || r.Jobs[0].JobID != i {
				t.Fatalf("first after the loss: %+v, want the interactive job", r)
			}
			if got := e.score(t, b); got != bt || got < bgBase || it >= bgBase {
				t.Fatalf("background job back at %v, want %v (interactive was at %v)", got, bt, it)
			}
			var order []string
			for {
				r := e.dispatch(t, 1)
				if len(r.Jobs) == 0 {
					break
				}
				order = append(order, r.Jobs[0].JobID)
			}
			if len(order) != 3 || order[2] != b {
				t.Fatalf("background jobs after the loss: %v, want %s last", order, b)
			}
		})
	}
}

// The gauges count the queue and the last minute's dispatches by class.
func TestGaugesByClass(t *testing.T) {
	e := newClassEnv(t, config.ModelGroup{RPM: 1000000, InputTPM: 100000000, OutputTPM: 100000000, BackgroundMinShare: 0.5})
	for range 4 {
		e.admitClass(t, "a", config.ClassInteractive, 10, 1)
		e.admitClass(t, "x", config.ClassBackground, 10, 1)
	}
	// Half the dispatches are owed to background: a, x, a, x.
	if r := e.dispatch(t, 4); len(r.Jobs) != 4 {
		t.Fatalf("dispatch: %+v", r)
	}
	g, err := e.s.Gauges(context.Background(), e.g)
	if err != nil {
		t.Fatal(err)
	}
	if g.Queued != 4 || g.QueuedBackground != 2 || g.Dispatched != 4 || g.DispatchedBackground != 2 {
		t.Fatalf("gauges: queued %d (background %d), dispatched %v (background %v)", g.Queued, g.QueuedBackground, g.Dispatched, g.DispatchedBackground)
	}
}

// The share counts the dispatches made while background jobs waited: a
// background job that arrives after a busy interactive minute is owed no
// burst, only its share from then on.
func TestBackgroundShareCountsOnlyWhileItWaits(t *testing.T) {
	e := newClassEnv(t, config.ModelGroup{RPM: 1000000, InputTPM: 100000000, OutputTPM: 100000000, BackgroundMinShare: 0.1})
	for range 100 {
		e.admitClass(t, "a", config.ClassInteractive, 10, 1)
	}
	for range 50 {
		e.dispatch(t, 1)
	}
	bg := map[string]bool{}
	for range 5 {
		id, _ := e.admitClass(t, "x", config.ClassBackground, 10, 1)
		bg[id] = true
	}
	var classes []string
	for range 20 {
		c := "i"
		if bg[e.dispatch(t, 1).Jobs[0].JobID] {
			c = "b"
		}
		classes = append(classes, c)
	}
	want := "i i i i i i i i i b i i i i i i i i i b"
	if diff := cmp.Diff(want, strings.Join(classes, " ")); diff != "" {
		t.Fatalf("classes in dispatch order (-want +got):\n%s", diff)
	}
}

// A background job held for a prompt-cache write keeps its place; the
// minimum share then goes to the next background job that can go, and the
// held one waits without holding up anyone.
func TestBackgroundShareLooksPastHeldJobs(t *testing.T) {
	g := cacheGroup()
	g.BackgroundMinShare = 0.5
	e := newClassEnv(t, g)
	admit := func(user, class string, ps ...scheduler.CachePrefix) string {
		return e.admitCachedClass(t, user, class, 7000, config.UserPolicy{}, ps...)
	}
	name := map[string]string{}
	for i := range 4 {
		name[admit(fmt.Sprint("i", i), config.ClassInteractive)] = fmt.Sprint("i", i+1)
	}
	name[admit("x", config.ClassBackground, syllabus)] = "b1" // the prefix's writer
	name[admit("y", config.ClassBackground, syllabus)] = "b2" // held for it
	name[admit("z", config.ClassBackground)] = "b3"
	var order []string
	for range 6 {
		r := e.dispatch(t, 1)
		if len(r.Jobs) != 1 {
			t.Fatalf("dispatch after %v: %+v", order, r)
		}
		order = append(order, name[r.Jobs[0].JobID])
	}
	if diff := cmp.Diff("i1 b1 i2 b3 i3 i4", strings.Join(order, " ")); diff != "" {
		t.Fatalf("dispatch order (-want +got):\n%s", diff)
	}
	if r := e.dispatch(t, 1); r.State != scheduler.Hold || len(r.Jobs) != 0 {
		t.Fatalf("with only the held job left: %+v", r)
	}
}

// An interactive V in background space (a dispatcher of a release before
// classes dispatched a background job) is taken as lost: interactive jobs
// stay in their own space and go first.
func TestInteractiveVInBackgroundSpaceIsDiscarded(t *testing.T) {
	e := newClassEnv(t, config.ModelGroup{RPM: 1000000, InputTPM: 100000000, OutputTPM: 100000000})
	ctx := context.Background()
	b, _ := e.admitClass(t, "x", config.ClassBackground, 10, 1)
	if err := e.rdb.Set(ctx, rkeys.FQ(e.g.Name, "vtime"), "1000000000000050", 0).Err(); err != nil {
		t.Fatal(err)
	}
	i, res := e.admitClass(t, "a", config.ClassInteractive, 10, 1)
	if res.Position != 1 || e.score(t, i) >= bgBase {
		t.Fatalf("interactive job admitted at %d, tag %v", res.Position, e.score(t, i))
	}
	var order []string
	for range 2 {
		order = append(order, e.dispatch(t, 1).Jobs[0].JobID)
	}
	if diff := cmp.Diff([]string{i, b}, order); diff != "" {
		t.Fatalf("order (-want +got):\n%s", diff)
	}
	if v, err := e.rdb.Get(ctx, rkeys.FQ(e.g.Name, "vtime")).Float64(); err != nil || v >= bgBase {
		t.Fatalf("interactive V after the round: %v %v", v, err)
	}
}

// A background job held for a prompt-cache write can be looked past twice
// in one round: by the background scan the minimum share starts, and by
// the ordinary scan once the interactive jobs are gone. The held gauge
// counts it once.
func TestHeldBackgroundJobCountedOnce(t *testing.T) {
	g := cacheGroup()
	g.BackgroundMinShare = 1
	e := newClassEnv(t, g)
	admit := func(user, class string, ps ...scheduler.CachePrefix) string {
		return e.admitCachedClass(t, user, class, 7000, config.UserPolicy{}, ps...)
	}
	writer := admit("x", config.ClassBackground, syllabus)
	if r := e.dispatch(t, 1); len(r.Jobs) != 1 || r.Jobs[0].JobID != writer {
		t.Fatalf("the prefix's writer: %+v", r)
	}
	admit("y", config.ClassBackground, syllabus) // held for the writer
	i := admit("i", config.ClassInteractive)
	r := e.dispatch(t, 5)
	if len(r.Jobs) != 1 || r.Jobs[0].JobID != i || r.State != scheduler.Hold {
		t.Fatalf("round: %+v, want the interactive job, then hold", r)
	}
	st, err := e.s.CacheStats(context.Background(), e.g.Name)
	if err != nil {
		t.Fatal(err)
	}
	if st.Held != 1 {
		t.Errorf("held = %d, want 1 (one job held)", st.Held)
	}
}
