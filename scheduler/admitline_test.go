package scheduler

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
)

// lineTest holds a group's line busy, as calls under way would, so that
// admissions queue behind them; release hands the line on as the end of
// one of those calls does.
type lineTest struct {
	t     *testing.T
	s     *Scheduler
	store *jobs.Store
	g     *config.ModelGroup
	l     *admitLine
}

func newLineTest(t *testing.T) *lineTest {
	rdb := redistest.Start(t).Client(t)
	store := jobs.NewStore(rdb, jobs.Options{})
	s := New(rdb, store, Options{LeaseTTL: time.Hour})
	g := &config.ModelGroup{Name: "g", RPM: 1000, InputTPM: 1e6, OutputTPM: 1e6, MaxConcurrency: 100, Burst: time.Minute}
	// Loaded beforehand, so that each call is one EVALSHA.
	if err := admitScript.Load(context.Background(), rdb).Err(); err != nil {
		t.Fatal(err)
	}
	lt := &lineTest{t: t, s: s, store: store, g: g, l: s.line(g.Name)}
	lt.l.calls = maxAdmitCalls
	return lt
}

func (lt *lineTest) admission(user string) Admission {
	j := &jobs.Job{ID: jobs.NewID(lt.g.Name), Tenant: "t", UserID: user, Model: "m", Group: lt.g.Name,
		MaxTokens: 100, Request: []byte(`{"model":"m"}`), CreatedAt: time.Now()}
	return Admission{Job: j, Group: lt.g, InputEstimate: 10, Policy: config.UserPolicy{Weight: 1}}
}

// waitFor waits until n admissions wait in the line.
func (lt *lineTest) waitFor(n int) {
	lt.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		lt.l.mu.Lock()
		got := len(lt.l.waiting)
		lt.l.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			lt.t.Fatalf("%d admissions in line, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// release ends one of the calls the test holds.
func (lt *lineTest) release() { lt.l.handOn() }

type admitted struct {
	a   Admission
	res AdmitResult
	err error
}

// queue starts each admission in turn, once the one before waits in line,
// so that the line holds them in this order.
func (lt *lineTest) queue(as []Admission) (wait func() []admitted) {
	lt.t.Helper()
	out := make([]admitted, len(as))
	var wg sync.WaitGroup
	lt.l.mu.Lock()
	before := len(lt.l.waiting)
	lt.l.mu.Unlock()
	for i, a := range as {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := lt.s.Admit(context.Background(), a)
			out[i] = admitted{a, res, err}
		}()
		lt.waitFor(before + i + 1)
	}
	return func() []admitted { wg.Wait(); return out }
}

func TestAdmissionsWaitingInLineGoInOneCall(t *testing.T) {
	lt := newLineTest(t)
	var as []Admission
	for i := range 12 {
		as = append(as, lt.admission(fmt.Sprint("user-", i%3)))
	}
	wait := lt.queue(as)
	_, before := redistest.ScriptTime(t, lt.s.rdb)
	lt.release()
	got := wait()
	if _, after := redistest.ScriptTime(t, lt.s.rdb); after-before != 1 {
		t.Fatalf("%d script calls for 12 admissions waiting in line, want 1", after-before)
	}
	// Three users' jobs, four each, in line order: fair order interleaves
	// them, so the k-th job of each user is at places 3k-2..3k.
	for i, r := range got {
		if r.err != nil || r.res.Outcome != Admitted {
			t.Fatalf("admission %d: %+v, %v", i, r.res, r.err)
		}
		if want := i + 1; r.res.Position != want {
			t.Errorf("admission %d (user %s): position %d, want %d", i, r.a.Job.UserID, r.res.Position, want)
		}
		j, err := lt.store.Get(context.Background(), r.a.Job.ID)
		if err != nil || j.Status != jobs.Queued {
			t.Fatalf("job %d: %+v, %v", i, j, err)
		}
	}
	if n, err := lt.s.rdb.HGet(context.Background(), keys{lt.g.Name}.totals(), "n").Int(); err != nil || n != 12 {
		t.Errorf("queue totals count %d jobs (%v), want 12", n, err)
	}
	if n := lt.s.rdb.HLen(context.Background(), keys{lt.g.Name}.costs()).Val(); n != 12 {
		t.Errorf("%d costs, want 12", n)
	}
	if n := lt.s.rdb.HLen(context.Background(), keys{lt.g.Name}.live()).Val(); n != 12 {
		t.Errorf("%d live jobs, want 12", n)
	}
	if n, _ := lt.s.rdb.HGet(context.Background(), jobs.WaitingUsersKey(lt.g.Name), UserKey("t", "user-1")).Int(); n != 4 {
		t.Errorf("user-1 has %d waiting jobs counted, want 4", n)
	}
}

// Each admission of a call sees those before it: the queue cap, the
// Idempotency-Key, and the sequence go on from one to the next.
func TestAdmissionsInOneCallSeeTheOnesBefore(t *testing.T) {
	lt := newLineTest(t)
	var as []Admission
	for range 7 {
		a := lt.admission("alice")
		a.Policy.MaxQueued = 5
		as = append(as, a)
	}
	same := lt.admission("bob")
	same.IdempotencyKey, same.BodyHash = "k1", "body-1"
	retry := lt.admission("bob")
	retry.IdempotencyKey, retry.BodyHash = "k1", "body-1"
	other := lt.admission("bob")
	other.IdempotencyKey, other.BodyHash = "k1", "body-2"
	as = append(as, same, retry, other)
	wait := lt.queue(as)
	lt.release()
	got := wait()
	for i, r := range got[:7] {
		if r.err != nil {
			t.Fatal(r.err)
		}
		if i < 5 && r.res.Outcome != Admitted {
			t.Errorf("alice's job %d: %s, want admitted", i+1, r.res.Outcome)
		}
		if i >= 5 && (r.res.Outcome != QueueLimit || r.res.Remaining != 5 || r.res.Limit != 5) {
			t.Errorf("alice's job %d: %+v, want queue_limit with 5 of 5 queued", i+1, r.res)
		}
	}
	if r := got[7]; r.err != nil || r.res.Outcome != Admitted {
		t.Fatalf("bob's first: %+v, %v", r.res, r.err)
	}
	if r := got[8]; r.err != nil || r.res.Outcome != Replay || r.res.ReplayOf != same.Job.ID {
		t.Errorf("bob's retry: %+v, %v; want a replay of %s", r.res, r.err, same.Job.ID)
	}
	if r := got[9]; r.err != nil || r.res.Outcome != Conflict {
		t.Errorf("bob's other body: %+v, %v; want a conflict", r.res, r.err)
	}
	// Refused jobs left nothing behind.
	for _, r := range append(got[5:7:7], got[8:]...) {
		if _, err := lt.store.Get(context.Background(), r.a.Job.ID); !errors.Is(err, jobs.ErrNotFound) {
			t.Errorf("refused job %s: %v, want not found", r.a.Job.ID, err)
		}
	}
	if n := lt.s.rdb.ZCard(context.Background(), keys{lt.g.Name}.order()).Val(); n != 6 {
		t.Errorf("%d jobs in the order, want 6", n)
	}
	if seq, _ := lt.s.rdb.Get(context.Background(), keys{lt.g.Name}.seq()).Int(); seq != 6 {
		t.Errorf("sequence %d after 6 admitted, want 6", seq)
	}
}

// An admission whose client gives up while it waits in line leaves it:
// its job is never admitted, and the rest go on.
func TestAdmissionLeavesTheLineWhenItsClientGivesUp(t *testing.T) {
	lt := newLineTest(t)
	first := lt.queue([]Admission{lt.admission("a")})
	gone := lt.admission("b")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := lt.s.Admit(ctx, gone)
		done <- err
	}()
	lt.waitFor(2)
	last := lt.queue([]Admission{lt.admission("c")})
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("the admission whose client gave up: %v, want context.Canceled", err)
	}
	lt.waitFor(2)
	lt.release()
	for _, r := range append(first(), last()...) {
		if r.err != nil || r.res.Outcome != Admitted {
			t.Fatalf("%+v, %v", r.res, r.err)
		}
	}
	if _, err := lt.store.Get(context.Background(), gone.Job.ID); !errors.Is(err, jobs.ErrNotFound) {
		t.Fatalf("the job whose client gave up: %v, want not found", err)
	}
	if n := lt.s.rdb.ZCard(context.Background(), keys{lt.g.Name}.order()).Val(); n != 2 {
		t.Errorf("%d jobs in the order, want 2", n)
	}
}

// More than one call's worth waiting: they go in calls of maxAdmitCall,
// each answered, the line free at the end.
func TestALongLineGoesInSeveralCalls(t *testing.T) {
	lt := newLineTest(t)
	n := 2*maxAdmitCall + 3
	var as []Admission
	for i := range n {
		as = append(as, lt.admission(fmt.Sprint("u", i)))
	}
	wait := lt.queue(as)
	_, before := redistest.ScriptTime(t, lt.s.rdb)
	lt.release()
	for i, r := range wait() {
		if r.err != nil || r.res.Outcome != Admitted {
			t.Fatalf("admission %d: %+v, %v", i, r.res, r.err)
		}
	}
	if _, after := redistest.ScriptTime(t, lt.s.rdb); after-before != 3 {
		t.Errorf("%d script calls for %d admissions, want 3", after-before, n)
	}
	lt.l.mu.Lock()
	defer lt.l.mu.Unlock()
	// The call release ended handed the line on until it was empty; the
	// other one the test holds is still under way.
	if lt.l.calls != maxAdmitCalls-1 || len(lt.l.waiting) != 0 {
		t.Errorf("line left with %d calls under way and %d waiting, want %d and 0", lt.l.calls, len(lt.l.waiting), maxAdmitCalls-1)
	}
}

// Both calls under way end before the admission chosen by the first takes
// its place: the second chooses another, and every call's place comes
// back when the line is empty.
func TestTwoCallsEndingTogetherEachHandOn(t *testing.T) {
	lt := newLineTest(t)
	var as []Admission
	for i := range 40 {
		as = append(as, lt.admission(fmt.Sprint("u", i)))
	}
	wait := lt.queue(as)
	lt.l.mu.Lock() // neither chosen admission can take its place yet
	first := lt.l.waiting[0]
	lt.l.mu.Unlock()
	lt.release()
	lt.release()
	lt.l.mu.Lock()
	chosen := 0
	for _, w := range lt.l.waiting {
		if w.lead {
			chosen++
		}
	}
	lt.l.mu.Unlock()
	if !first.lead || chosen > 2 {
		t.Fatalf("after two calls ended: first chosen %v, %d chosen in line", first.lead, chosen)
	}
	for i, r := range wait() {
		if r.err != nil || r.res.Outcome != Admitted {
			t.Fatalf("admission %d: %+v, %v", i, r.res, r.err)
		}
	}
	lt.l.mu.Lock()
	calls, waiting := lt.l.calls, len(lt.l.waiting)
	lt.l.mu.Unlock()
	if calls != 0 || waiting != 0 {
		t.Errorf("line left with %d calls under way and %d waiting, want none", calls, waiting)
	}
	// Admissions after that go at once again.
	if res, err := lt.s.Admit(context.Background(), lt.admission("later")); err != nil || res.Outcome != Admitted {
		t.Fatalf("a later admission: %+v, %v", res, err)
	}
}
