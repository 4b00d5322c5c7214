package loadtest

import (
	"math"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// base is an arbitrary instant; at(s) is s seconds after it.
var base = time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)

func at(s float64) time.Time { return base.Add(time.Duration(math.Round(s * float64(time.Second)))) }

// job is a Job created at c seconds and started at s seconds (s < 0: never).
func job(id, user string, seq int, c, s float64) Job {
	j := Job{ID: id, User: user, Class: "c", Seq: seq, CreatedAt: at(c)}
	if s >= 0 {
		j.StartedAt = at(s)
	}
	return j
}

var approx = cmpopts.EquateApprox(0, 1e-9)

func TestSummarize(t *testing.T) {
	hundred := make([]float64, 100)
	for i := range hundred {
		hundred[i] = float64(100 - i) // unsorted on purpose
	}
	for _, tc := range []struct {
		name string
		xs   []float64
		want Summary
	}{
		{"empty", nil, Summary{}},
		{"one", []float64{5}, Summary{N: 1, P50: 5, P95: 5, Max: 5}},
		{"three", []float64{3, 1, 2}, Summary{N: 3, P50: 2, P95: 3, Max: 3}},
		{"two: nearest rank takes the lower for p50", []float64{10, 20}, Summary{N: 2, P50: 10, P95: 20, Max: 20}},
		{"1..100", hundred, Summary{N: 100, P50: 50, P95: 95, Max: 100}},
		{"twenty: p95 is the 19th", []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20}, Summary{N: 20, P50: 10, P95: 19, Max: 20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, Summarize(tc.xs)); diff != "" {
				t.Errorf("Summarize(%v) (-want +got):\n%s", tc.xs, diff)
			}
		})
	}
}

func TestJain(t *testing.T) {
	for _, tc := range []struct {
		name   string
		xs     []float64
		want   float64
		wantOK bool
	}{
		{"equal", []float64{7, 7, 7, 7}, 1, true},
		{"one of four gets all", []float64{0, 0, 9, 0}, 0.25, true},
		{"1 2 3", []float64{1, 2, 3}, 36.0 / 42, true},
		{"single", []float64{3}, 1, true},
		{"empty", nil, 0, false},
		{"nobody served", []float64{0, 0}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := Jain(tc.xs)
			if ok != tc.wantOK || math.Abs(got-tc.want) > 1e-12 {
				t.Errorf("Jain(%v) = %v, %v; want %v, %v", tc.xs, got, ok, tc.want, tc.wantOK)
			}
		})
	}
}

func TestJainBestPossible(t *testing.T) {
	for _, tc := range []struct {
		n, d int
		want float64
	}{
		{20, 100, 1},                    // five rounds exactly
		{20, 110, 12100.0 / (20 * 610)}, // half the users one ahead
		{30, 75, 5625.0 / (30 * 195)},   // 2.5 each: 0.96
		{4, 1, 0.25},                    // one job among four
		{0, 5, 0}, {5, 0, 0},            // nothing to share
		{3, 7, 49.0 / (3 * (9 + 4 + 4))},            // 3, 2, 2
		{1000, 999_999, JainBestPos(1000, 999_999)}, // large: no overflow
	} {
		if got := JainBestPossible(tc.n, tc.d); math.Abs(got-tc.want) > 1e-12 {
			t.Errorf("JainBestPossible(%d, %d) = %v, want %v", tc.n, tc.d, got, tc.want)
		}
	}
}

// JainBestPos is JainBestPossible by the closed form, to check the large case.
func JainBestPos(n, d int) float64 {
	k, r := float64(d/n), float64(d%n)
	sum := float64(d)
	sq := r*(k+1)*(k+1) + (float64(n)-r)*k*k
	return sum * sum / (float64(n) * sq)
}

func TestBacklogSpans(t *testing.T) {
	horizon := at(100)
	jobs := []Job{
		job("a1", "a", 0, 0, 5),
		job("a2", "a", 1, 1, 8),   // overlaps a1
		job("a3", "a", 2, 8, 9),   // touches a2: merged
		job("a4", "a", 3, 20, 25), // a gap, then a new span
		job("b1", "b", 4, 2, -1),  // never started: until the horizon
		job("c1", "c", 5, 3, 3),   // started at once: an empty span
	}
	got := BacklogSpans(jobs, horizon)
	want := map[string][]Window{
		"a": {{at(0), at(9)}, {at(20), at(25)}},
		"b": {{at(2), at(100)}},
		"c": {{at(3), at(3)}},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("BacklogSpans (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]Window{{at(0), at(100)}}, QueueSpans(jobs, horizon)); diff != "" {
		t.Errorf("QueueSpans (-want +got):\n%s", diff)
	}
	long, ok := Longest(got["a"])
	if !ok || long != (Window{at(0), at(9)}) {
		t.Errorf("Longest = %v, %v", long, ok)
	}
	for _, tc := range []struct {
		w    Window
		want bool
	}{
		{Window{at(1), at(9)}, true},
		{Window{at(0), at(9)}, true},
		{Window{at(5), at(21)}, false}, // across the gap
		{Window{at(21), at(24)}, true},
		{Window{at(24), at(26)}, false},
	} {
		if got := Covers(got["a"], tc.w); got != tc.want {
			t.Errorf("Covers(a, %v–%v) = %v, want %v", tc.w.Start.Sub(base), tc.w.End.Sub(base), got, tc.want)
		}
	}
}

func TestActiveWindow(t *testing.T) {
	jobs := []Job{job("a", "u", 0, 2, 3), job("b", "u", 1, 1, 4)}
	jobs[0].FinishedAt = at(10)
	if got, want := ActiveWindow(jobs, at(50)), (Window{at(1), at(50)}); got != want {
		t.Errorf("ActiveWindow = %v, want %v (b never finished: the horizon)", got, want)
	}
}

func TestJainOverAndBurstWindow(t *testing.T) {
	// Three users queue at 0–1 s; a new job starts every second in
	// round-robin order a, b, c, a, b, c, ...; a has 2 jobs, b 4, c 4.
	var jobs []Job
	seq := 0
	add := func(user string, start float64) {
		j := job(user+string(rune('0'+seq)), user, seq, float64(seq)/10, start)
		j.Tokens = 100
		jobs = append(jobs, j)
		seq++
	}
	add("a", 1)
	add("b", 2)
	add("c", 3)
	add("a", 4)
	add("b", 5)
	add("c", 6)
	add("b", 7)
	add("c", 8)
	add("b", 9)
	add("c", 10)
	last := at(0.9) // the last submission

	w, ok := BurstFairnessWindow(jobs, last, at(100), "")
	// Backlog ends: a at 4, b at 9, c at 10; the upper median is 9.
	if !ok || w != (Window{last, at(9)}) {
		t.Fatalf("BurstFairnessWindow = %v–%v, %v; want 0.9s–9s", w.Start.Sub(base), w.End.Sub(base), ok)
	}
	f := JainOver(jobs, w, at(100), "")
	want := Fairness{Window: w, Users: []string{"b", "c"}, Served: []float64{300, 300}, Dispatches: 6, Index: 1, OK: true}
	if diff := cmp.Diff(want, f, approx); diff != "" {
		t.Errorf("JainOver (-want +got):\n%s", diff)
	}

	// Over 0.9–10.5 s only c was queued all along: one user, no index.
	f = JainOver(jobs, Window{last, at(10.5)}, at(100), "")
	if f.OK || len(f.Users) != 0 {
		t.Errorf("JainOver past b's backlog = %+v, want no users", f)
	}

	// A skewed window: a is served twice as much.
	skew := []Job{job("a1", "a", 0, 0, 1), job("a2", "a", 1, 0, 2), job("b1", "b", 2, 0, 3), job("a3", "a", 3, 0, 50), job("b2", "b", 4, 0, 50)}
	for i := range skew {
		skew[i].Tokens = 10
	}
	f = JainOver(skew, Window{at(0.5), at(3.5)}, at(100), "")
	if !f.OK || math.Abs(f.Index-0.9) > 1e-12 || f.Dispatches != 3 {
		t.Errorf("JainOver skewed = %+v, want index (20+10)²/(2·(400+100)) = 0.9 over 3 dispatches", f)
	}

	// Only one user backlogged at the last arrival: no window.
	if _, ok := BurstFairnessWindow([]Job{job("x", "x", 0, 0, 5)}, at(0), at(100), ""); ok {
		t.Error("BurstFairnessWindow with one user: want !ok")
	}
}

func TestDispatchOrder(t *testing.T) {
	jobs := []Job{
		job("z", "u", 0, 1, 5),
		job("b", "u", 1, 2, 3),
		job("a", "u", 2, 2, 3), // same start and creation as b: by id
		job("q", "u", 3, 0, 3), // same start, created earlier: first
		job("n", "u", 4, 0, -1),
	}
	if diff := cmp.Diff([]int{3, 2, 1, 0}, DispatchOrder(jobs)); diff != "" {
		t.Errorf("DispatchOrder (-want +got):\n%s", diff)
	}
}

func TestMeasurePositions(t *testing.T) {
	withPos := func(j Job, p int) Job { j.Position = p; return j }
	for _, tc := range []struct {
		name string
		jobs []Job
		want PositionAccuracy
	}{
		{
			name: "FIFO, every position exact",
			jobs: []Job{
				withPos(job("1", "a", 0, 0, 1), 1),
				withPos(job("2", "a", 1, 0.1, 2), 2),
				withPos(job("3", "b", 2, 0.2, 3), 3),
			},
			want: PositionAccuracy{Jobs: 3, MeanAbsError: 0, ExactFraction: 1, MeanAbsErrorInclLater: 0, MeanReported: 2, MeanActual: 2},
		},
		{
			name: "a job already dispatched is not ahead",
			jobs: []Job{
				withPos(job("1", "a", 0, 0, 0.05), 1),
				withPos(job("2", "a", 1, 0.1, 2), 1), // 1 started before 2 arrived
				withPos(job("3", "b", 2, 0.2, 3), 2),
			},
			want: PositionAccuracy{Jobs: 3, ExactFraction: 1, MeanReported: 4.0 / 3, MeanActual: 4.0 / 3},
		},
		{
			name: "a newcomer overtakes: exact among those queued, not as a promise of the wait",
			jobs: []Job{
				withPos(job("h1", "h", 0, 0, 1), 1),
				withPos(job("h2", "h", 1, 0, 3), 2),
				withPos(job("l1", "l", 2, 0.5, 2), 2), // told 2 (h1 ahead... and h2), starts after h1 only
			},
			// h2: actual among queued = 2 (h1) → exact; incl. later: l1 also
			// overtook → 3, error 1. l1: queued at its arrival were h1 and
			// h2; only h1 started before it → actual 2, exact.
			want: PositionAccuracy{Jobs: 3, ExactFraction: 1, MeanAbsErrorInclLater: 1.0 / 3, MeanReported: 5.0 / 3, MeanActual: 5.0 / 3},
		},
		{
			name: "wrong positions, unstarted and unreported jobs left out",
			jobs: []Job{
				withPos(job("1", "a", 0, 0, 1), 3),  // actual 1: error 2
				withPos(job("2", "a", 1, 0, 2), 1),  // actual 2: error 1
				withPos(job("3", "a", 2, 0, -1), 3), // never started
				job("4", "a", 3, 0, 4),              // no position
			},
			want: PositionAccuracy{Jobs: 2, MeanAbsError: 1.5, ExactFraction: 0, MeanAbsErrorInclLater: 1.5, MeanReported: 2, MeanActual: 1.5},
		},
		{
			name: "a start in the same millisecond as a submission counts as ahead",
			jobs: []Job{
				withPos(job("1", "a", 0, 0, 1), 1),
				withPos(job("2", "a", 1, 1, 2), 2),
			},
			want: PositionAccuracy{Jobs: 2, ExactFraction: 1, MeanReported: 1.5, MeanActual: 1.5},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, MeasurePositions(tc.jobs), approx); diff != "" {
				t.Errorf("MeasurePositions (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDispatchesBefore(t *testing.T) {
	// The heavy user queues h1..h6 at 0 s; dispatches at 1, 2, 3, ... s.
	heavy := func(n int, starts ...float64) []Job {
		var js []Job
		for i := range n {
			s := -1.0
			if i < len(starts) {
				s = starts[i]
			}
			j := job("h"+string(rune('1'+i)), "heavy", i, 0, s)
			j.Class = "heavy"
			js = append(js, j)
		}
		return js
	}
	light := func(seq int, c, s float64) Job {
		j := job("l", "light", seq, c, s)
		j.Class = "light"
		return j
	}
	for _, tc := range []struct {
		name        string
		jobs        []Job
		wantN       int
		wantStarted bool
		wantBacklog int
	}{
		{"next: starts right after arriving", append(heavy(6, 1, 2, 4, 5), light(6, 2.5, 3)), 0, true, 4},
		{"two heavy dispatches first", append(heavy(6, 1, 2, 3, 4, 6), light(6, 1.5, 5)), 3, true, 5},
		{"same millisecond as the arrival counts", append(heavy(6, 1, 2, 4), light(6, 2, 3)), 1, true, 5},
		{"FIFO: behind every heavy job", append(heavy(6, 1, 2, 3, 4, 5, 6), light(6, 0.5, 7)), 6, true, 6},
		{"never started: a lower bound", append(heavy(6, 1, 2, 3), light(6, 1.5, -1)), 2, false, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := len(tc.jobs) - 1
			n, started := DispatchesBefore(tc.jobs, l)
			if n != tc.wantN || started != tc.wantStarted {
				t.Errorf("DispatchesBefore = %d, %v; want %d, %v", n, started, tc.wantN, tc.wantStarted)
			}
			if b := Backlog(tc.jobs, l, "heavy"); b != tc.wantBacklog {
				t.Errorf("Backlog = %d, want %d", b, tc.wantBacklog)
			}
		})
	}
}

func TestCountersAt(t *testing.T) {
	samples := []Sample{
		{At: at(0), Counters: Counters{0, 0, 0}},
		{At: at(1), Counters: Counters{10, 1000, 100}},
		{At: at(3), Counters: Counters{30, 1000, 300}},
	}
	for _, tc := range []struct {
		t      float64
		want   Counters
		wantOK bool
	}{
		{0, Counters{0, 0, 0}, true},
		{0.5, Counters{5, 500, 50}, true},
		{1, Counters{10, 1000, 100}, true},
		{2.5, Counters{25, 1000, 250}, true},
		{3, Counters{30, 1000, 300}, true},
		{-0.1, Counters{}, false},
		{3.1, Counters{}, false},
	} {
		got, ok := CountersAt(samples, at(tc.t))
		if ok != tc.wantOK {
			t.Errorf("CountersAt(%vs) ok = %v", tc.t, ok)
		}
		if diff := cmp.Diff(tc.want, got, approx); diff != "" {
			t.Errorf("CountersAt(%vs) (-want +got):\n%s", tc.t, diff)
		}
	}
	if _, ok := CountersAt(nil, at(0)); ok {
		t.Error("CountersAt with no samples: want !ok")
	}
}

func TestUtilize(t *testing.T) {
	tier1 := Limits{RPM: 50, InputTPM: 30_000, OutputTPM: 8_000, MaxConcurrency: 8}
	for _, tc := range []struct {
		name     string
		delta    Counters
		d        time.Duration
		inFlight float64
		want     Fractions
	}{
		{
			name: "requests bind", delta: Counters{98, 98 * 112, 98 * 100}, d: 2 * time.Minute, inFlight: 2,
			want: Fractions{RPM: 0.98, InputTPM: 98 * 112 / 60_000.0, OutputTPM: 9800 / 16_000.0, Concurrency: 0.25, Binding: DimRPM,
				PerMinute: Counters{49, 49 * 112, 4900}},
		},
		{
			name: "output binds", delta: Counters{40, 4000, 8000}, d: time.Minute, inFlight: -1,
			want: Fractions{RPM: 0.8, InputTPM: 4000 / 30_000.0, OutputTPM: 1, Concurrency: -1, Binding: DimOutputTPM,
				PerMinute: Counters{40, 4000, 8000}},
		},
		{
			name: "the initial burst shows over 100%", delta: Counters{150, 150 * 112, 15_000}, d: 2 * time.Minute, inFlight: 8,
			want: Fractions{RPM: 1.5, InputTPM: 150 * 112 / 60_000.0, OutputTPM: 15_000 / 16_000.0, Concurrency: 1, Binding: DimRPM,
				PerMinute: Counters{75, 75 * 112, 7500}},
		},
		{
			name: "full concurrency binds", delta: Counters{10, 1000, 100}, d: time.Minute, inFlight: 7.6,
			want: Fractions{RPM: 0.2, InputTPM: 1000 / 30_000.0, OutputTPM: 100 / 8000.0, Concurrency: 0.95, Binding: DimConcurrency,
				PerMinute: Counters{10, 1000, 100}},
		},
		{name: "empty window", d: 0, want: Fractions{Concurrency: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, Utilize(tc.delta, tc.d, tc.inFlight, tier1), approx); diff != "" {
				t.Errorf("Utilize (-want +got):\n%s", diff)
			}
		})
	}
}

func TestMeanInFlight(t *testing.T) {
	samples := []Sample{{At: at(0), InFlight: 8}, {At: at(1), InFlight: 4}, {At: at(2), InFlight: 6}, {At: at(3), InFlight: 0}}
	for _, tc := range []struct {
		w      Window
		want   float64
		wantOK bool
	}{
		{Window{at(0), at(3)}, 4.5, true},
		{Window{at(0.5), at(2)}, 5, true}, // the end is included
		{Window{at(3.5), at(9)}, 0, false},
	} {
		got, ok := MeanInFlight(samples, tc.w)
		if ok != tc.wantOK || math.Abs(got-tc.want) > 1e-12 {
			t.Errorf("MeanInFlight(%v–%v) = %v, %v; want %v, %v", tc.w.Start.Sub(base), tc.w.End.Sub(base), got, ok, tc.want, tc.wantOK)
		}
	}
}

func TestServedIn(t *testing.T) {
	tok := func(j Job, in, out int) Job { j.Input, j.Output = in, out; return j }
	jobs := []Job{
		tok(job("a", "u", 0, 0, 1), 100, 10),
		tok(job("b", "u", 1, 0, 5), 200, 20),
		tok(job("c", "u", 2, 0, 10), 400, 40), // at the end: outside [start, end)
		tok(job("d", "u", 3, 0, -1), 800, 80),
	}
	if diff := cmp.Diff(Counters{2, 300, 30}, ServedIn(jobs, Window{at(1), at(10)})); diff != "" {
		t.Errorf("ServedIn (-want +got):\n%s", diff)
	}
}

func TestClockOffset(t *testing.T) {
	sent := []time.Time{at(0), at(1), at(2)}
	answered := []time.Time{at(0.2), at(1.2), at(2.4)}
	// sluice's clock 5 s ahead; one outlier.
	created := []time.Time{at(5.1), at(6.1), at(9)}
	if got, want := ClockOffset(sent, answered, created), 5*time.Second; got != want {
		t.Errorf("ClockOffset = %v, want %v", got, want)
	}
	if got := ClockOffset(nil, nil, nil); got != 0 {
		t.Errorf("ClockOffset of nothing = %v", got)
	}
}

func TestLastAdmission(t *testing.T) {
	for _, tc := range []struct {
		name   string
		reqs   []float64 // one sample a second from 0 s
		want   float64
		wantOK bool
	}{
		{"admissions stop at 2 s", []float64{0, 5, 9, 9, 9}, 2, true},
		{"still admitting at the end", []float64{0, 1, 2}, 2, true},
		{"nothing admitted", []float64{3, 3, 3}, 0, false},
		{"one sample", []float64{3}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var samples []Sample
			for i, r := range tc.reqs {
				samples = append(samples, Sample{At: at(float64(i)), Counters: Counters{Requests: r}})
			}
			got, ok := LastAdmission(samples)
			if ok != tc.wantOK || (ok && !got.Equal(at(tc.want))) {
				t.Errorf("LastAdmission = %v, %v; want %vs, %v", got.Sub(base), ok, tc.want, tc.wantOK)
			}
		})
	}
}
