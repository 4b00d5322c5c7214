package loadtest

import (
	"cmp"
	"math"
	"slices"
	"time"
)

// This file holds the arithmetic of the report: pure functions of the jobs
// as sluice reported them and of the fake's counters, so that every figure
// can be checked by a table test.

// Job is one submitted job as the load tester knows it at the end of a run.
// CreatedAt, StartedAt and FinishedAt are sluice's own timestamps (its
// clock, millisecond precision); comparisons between a submission and a
// dispatch always use them, never the load tester's clock, so that a
// remote sluice with a skewed clock is measured correctly.
type Job struct {
	ID    string
	User  string
	Class string // the user class, e.g. "student", "heavy", "light", "user"
	// Seq orders submissions: k was submitted before j if k.Seq < j.Seq.
	Seq int
	// Position is the position sluice reported in its 202 answer; 0 if none.
	Position  int
	Status    string
	CreatedAt time.Time
	StartedAt time.Time // zero: never started (as far as the run saw)
	// DispatchedAt and DispatchSeq are the scheduler's dispatch time and
	// order, when the sluice reports them (zero otherwise): the order fair
	// queuing chose, which started_at can blur by a few milliseconds when
	// several jobs are dispatched at once.
	DispatchedAt time.Time
	DispatchSeq  int64
	FinishedAt   time.Time // zero: not finished
	// Tokens are the tokens the job was served: input + cache writes +
	// output from its usage; 0 without usage.
	Tokens   int
	HasUsage bool
	Input    int // input_tokens + cache_creation_input_tokens
	Output   int // output_tokens
}

// Started reports whether the job was dispatched.
func (j *Job) Started() bool { return !j.StartedAt.IsZero() }

// dispatchTime is when the job left the queue: its dispatch time when
// known, else its start.
func (j *Job) dispatchTime() time.Time {
	if !j.DispatchedAt.IsZero() {
		return j.DispatchedAt
	}
	return j.StartedAt
}

// Window is the half-open interval [Start, End).
type Window struct {
	Start, End time.Time
}

// Duration is the window's length; never negative.
func (w Window) Duration() time.Duration { return max(0, w.End.Sub(w.Start)) }

// Contains reports whether t is in [Start, End).
func (w Window) Contains(t time.Time) bool { return !t.Before(w.Start) && t.Before(w.End) }

// Summary is the nearest-rank p50, p95 and maximum of a set of values.
type Summary struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50"`
	P95 float64 `json:"p95"`
	Max float64 `json:"max"`
}

// Summarize returns the nearest-rank percentiles of xs (the p-th percentile
// is the smallest value with at least p% of the values at or below it).
// An empty xs gives a zero Summary with N = 0.
func Summarize(xs []float64) Summary {
	if len(xs) == 0 {
		return Summary{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return Summary{N: len(s), P50: Percentile(s, 50), P95: Percentile(s, 95), Max: s[len(s)-1]}
}

// Percentile is the nearest-rank p-th percentile (0 < p ≤ 100) of sorted,
// which must be sorted ascending and not empty.
func Percentile(sorted []float64, p float64) float64 {
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

// Jain is Jain's fairness index (Σx)² / (n·Σx²) of xs: 1 when all are
// equal, 1/n when one gets everything. ok is false for fewer than one
// value or when all are zero (nobody was served: fairness is undefined).
func Jain(xs []float64) (index float64, ok bool) {
	var sum, sq float64
	for _, x := range xs {
		sum += x
		sq += x * x
	}
	if len(xs) == 0 || sq == 0 {
		return 0, false
	}
	return sum * sum / (float64(len(xs)) * sq), true
}

// JainBestPossible is the highest Jain index that n users can reach when
// dispatches equal, indivisible jobs are shared among them: each gets
// ⌊d/n⌋ or one more. It is the ceiling a perfect round robin meets on a
// window that does not end on a round boundary, so a measured index is
// best read against it when users get only a few jobs each.
func JainBestPossible(n, dispatches int) float64 {
	if n <= 0 || dispatches <= 0 {
		return 0
	}
	k, r := dispatches/n, dispatches%n
	xs := make([]float64, n)
	for i := range xs {
		xs[i] = float64(k)
		if i < r {
			xs[i]++
		}
	}
	j, _ := Jain(xs)
	return j
}

// BacklogSpans returns, per user, the times that user had at least one job
// submitted and not yet started: the union of [CreatedAt, StartedAt) of
// their jobs, with horizon standing in for the start of a job that never
// started. Spans are sorted and do not overlap or touch.
func BacklogSpans(jobs []Job, horizon time.Time) map[string][]Window {
	byUser := map[string][]Window{}
	for _, j := range jobs {
		end := j.StartedAt
		if !j.Started() {
			end = horizon
		}
		if end.Before(j.CreatedAt) {
			end = j.CreatedAt
		}
		byUser[j.User] = append(byUser[j.User], Window{j.CreatedAt, end})
	}
	for u, ws := range byUser {
		byUser[u] = union(ws)
	}
	return byUser
}

// QueueSpans is BacklogSpans for all users together: the times at least
// one job was queued.
func QueueSpans(jobs []Job, horizon time.Time) []Window {
	all := make([]Job, len(jobs))
	for i, j := range jobs {
		j.User = ""
		all[i] = j
	}
	return BacklogSpans(all, horizon)[""]
}

// union merges overlapping or touching windows.
func union(ws []Window) []Window {
	ws = slices.Clone(ws)
	slices.SortFunc(ws, func(a, b Window) int { return a.Start.Compare(b.Start) })
	var out []Window
	for _, w := range ws {
		if n := len(out); n > 0 && !w.Start.After(out[n-1].End) {
			if w.End.After(out[n-1].End) {
				out[n-1].End = w.End
			}
			continue
		}
		out = append(out, w)
	}
	return out
}

// Longest is the longest of ws (the earliest among equals); ok is false
// for none.
func Longest(ws []Window) (w Window, ok bool) {
	for _, x := range ws {
		if !ok || x.Duration() > w.Duration() {
			w, ok = x, true
		}
	}
	return w, ok
}

// ActiveWindow runs from the first job's creation to the last finish
// (horizon for a job not finished).
func ActiveWindow(jobs []Job, horizon time.Time) Window {
	var w Window
	for i, j := range jobs {
		end := j.FinishedAt
		if end.IsZero() {
			end = horizon
		}
		if i == 0 || j.CreatedAt.Before(w.Start) {
			w.Start = j.CreatedAt
		}
		w.End = maxTime(w.End, end)
	}
	return w
}

// Covers reports whether one of the spans holds all of w.
func Covers(spans []Window, w Window) bool {
	for _, s := range spans {
		if !s.Start.After(w.Start) && !s.End.Before(w.End) {
			return true
		}
	}
	return false
}

// spanAt returns the span that contains t (Start ≤ t ≤ End).
func spanAt(spans []Window, t time.Time) (Window, bool) {
	for _, s := range spans {
		if !t.Before(s.Start) && !t.After(s.End) {
			return s, true
		}
	}
	return Window{}, false
}

// Fairness is Jain's index over the users who were backlogged for a whole
// window, of the tokens served to each (jobs started in the window).
type Fairness struct {
	Window Window
	// Users are the users backlogged for the whole window, sorted.
	Users      []string
	Served     []float64 // tokens per user, in the order of Users
	Dispatches int       // their jobs started in the window
	Index      float64
	OK         bool
}

// JainOver computes Fairness for window w among the users (of the given
// class, or all when class is "") backlogged for all of w.
func JainOver(jobs []Job, w Window, horizon time.Time, class string) Fairness {
	f := Fairness{Window: w}
	spans := BacklogSpans(jobs, horizon)
	in := map[string]bool{}
	for _, j := range jobs {
		if (class == "" || j.Class == class) && !in[j.User] && Covers(spans[j.User], w) {
			in[j.User] = true
			f.Users = append(f.Users, j.User)
		}
	}
	slices.Sort(f.Users)
	served := map[string]float64{}
	for _, j := range jobs {
		if in[j.User] && j.Started() && w.Contains(j.StartedAt) {
			served[j.User] += float64(j.Tokens)
			f.Dispatches++
		}
	}
	for _, u := range f.Users {
		f.Served = append(f.Served, served[u])
	}
	if len(f.Users) >= 2 {
		f.Index, f.OK = Jain(f.Served)
	}
	return f
}

// BurstFairnessWindow picks the window for Jain's index after a burst of
// arrivals that ends at t0 (the last submission): it starts at t0 and ends
// when the median user among those backlogged at t0 ran out of queued
// jobs. Ending at the first user to run out would leave a window of about
// one job per user; ending at the last would leave only one user. The
// median keeps about half of the users and several jobs each. ok is false
// when fewer than two users were backlogged at t0.
func BurstFairnessWindow(jobs []Job, t0, horizon time.Time, class string) (Window, bool) {
	spans := BacklogSpans(jobs, horizon)
	var ends []time.Time
	seen := map[string]bool{}
	for _, j := range jobs {
		if (class != "" && j.Class != class) || seen[j.User] {
			continue
		}
		seen[j.User] = true
		if s, ok := spanAt(spans[j.User], t0); ok && s.End.After(t0) {
			ends = append(ends, s.End)
		}
	}
	if len(ends) < 2 {
		return Window{}, false
	}
	slices.SortFunc(ends, time.Time.Compare)
	// The upper median: with an even count, the later of the two middle
	// ends, so that at least half of the users stay in.
	return Window{Start: t0, End: ends[len(ends)/2]}, true
}

// DispatchOrder returns the indexes of the started jobs in the order they
// were dispatched: by the scheduler's DispatchSeq when both jobs have one,
// else by StartedAt, then CreatedAt, then ID (sluice keeps milliseconds, so
// equal start times are common under load).
func DispatchOrder(jobs []Job) []int {
	var idx []int
	for i := range jobs {
		if jobs[i].Started() {
			idx = append(idx, i)
		}
	}
	slices.SortFunc(idx, func(a, b int) int {
		x, y := &jobs[a], &jobs[b]
		if x.DispatchSeq > 0 && y.DispatchSeq > 0 {
			return cmp.Compare(x.DispatchSeq, y.DispatchSeq)
		}
		return cmp.Or(x.StartedAt.Compare(y.StartedAt), x.CreatedAt.Compare(y.CreatedAt), cmp.Compare(x.ID, y.ID))
	})
	return idx
}

// ranks maps a job index to its place in DispatchOrder (0-based); jobs
// that never started get -1.
func ranks(jobs []Job) []int {
	r := make([]int, len(jobs))
	for i := range r {
		r[i] = -1
	}
	for place, i := range DispatchOrder(jobs) {
		r[i] = place
	}
	return r
}

// queuedAt reports whether job k was waiting when job j was submitted:
// submitted before j and not started before j's CreatedAt. A start in the
// same millisecond as j's creation counts as still waiting (the
// conservative reading: it may have been ahead of j).
func queuedAt(k, j *Job) bool {
	return k.Seq < j.Seq && (!k.Started() || !k.dispatchTime().Before(j.CreatedAt))
}

// PositionAccuracy compares the position sluice reported at submit with
// the rank the job actually had.
type PositionAccuracy struct {
	// Jobs is how many jobs were compared: started, with a reported position.
	Jobs int `json:"jobs"`
	// MeanAbsError is the mean of |reported − actual|, where actual is one
	// plus the jobs that were queued when it was submitted and started
	// before it: what the position promised to count.
	MeanAbsError float64 `json:"mean_abs_error"`
	// ExactFraction is the share of jobs whose reported position was exact.
	ExactFraction float64 `json:"exact_fraction"`
	// MeanAbsErrorInclLater also counts jobs submitted later that started
	// before it (a fair queue legitimately lets a newcomer overtake): the
	// error of the position as a promise of the real wait in dispatches.
	MeanAbsErrorInclLater float64 `json:"mean_abs_error_incl_later_arrivals"`
	// MeanReported and MeanActual help read the error's direction.
	MeanReported float64 `json:"mean_reported"`
	MeanActual   float64 `json:"mean_actual"`
}

// MeasurePositions computes PositionAccuracy over jobs of one model group.
// It is O(n²) in the number of jobs, fine for the thousands a run makes.
func MeasurePositions(jobs []Job) PositionAccuracy {
	r := ranks(jobs)
	var pa PositionAccuracy
	var sumErr, sumErrAll, sumRep, sumAct float64
	exact := 0
	for j := range jobs {
		jb := &jobs[j]
		if r[j] < 0 || jb.Position <= 0 {
			continue
		}
		ahead, aheadAll := 0, 0
		for k := range jobs {
			if k == j || r[k] < 0 || r[k] > r[j] {
				continue
			}
			kb := &jobs[k]
			if queuedAt(kb, jb) {
				ahead++
				aheadAll++
			} else if !kb.dispatchTime().Before(jb.CreatedAt) {
				aheadAll++ // submitted later (or together) and overtook
			}
		}
		actual := ahead + 1
		pa.Jobs++
		sumErr += math.Abs(float64(jb.Position - actual))
		sumErrAll += math.Abs(float64(jb.Position - (aheadAll + 1)))
		sumRep += float64(jb.Position)
		sumAct += float64(actual)
		if jb.Position == actual {
			exact++
		}
	}
	if pa.Jobs > 0 {
		n := float64(pa.Jobs)
		pa.MeanAbsError = sumErr / n
		pa.MeanAbsErrorInclLater = sumErrAll / n
		pa.ExactFraction = float64(exact) / n
		pa.MeanReported = sumRep / n
		pa.MeanActual = sumAct / n
	}
	return pa
}

// DispatchesBefore counts the other jobs that started after job j was
// submitted and before j started: how many dispatches j waited. For a job
// that never started it counts every dispatch after its submission (a
// lower bound) and started is false.
func DispatchesBefore(jobs []Job, j int) (n int, started bool) {
	r := ranks(jobs)
	jb := &jobs[j]
	for k := range jobs {
		if k == j || r[k] < 0 {
			continue
		}
		if jobs[k].dispatchTime().Before(jb.CreatedAt) {
			continue // dispatched before j arrived
		}
		if r[j] < 0 || r[k] < r[j] {
			n++
		}
	}
	return n, r[j] >= 0
}

// Backlog counts the jobs of class (all when "") queued when job j was
// submitted.
func Backlog(jobs []Job, j int, class string) int {
	n := 0
	for k := range jobs {
		if k != j && (class == "" || jobs[k].Class == class) && queuedAt(&jobs[k], &jobs[j]) {
			n++
		}
	}
	return n
}

// Counters are cumulative upstream (or served) amounts at an instant.
type Counters struct {
	Requests     float64
	InputTokens  float64
	OutputTokens float64
}

// Sub is c − o.
func (c Counters) Sub(o Counters) Counters {
	return Counters{c.Requests - o.Requests, c.InputTokens - o.InputTokens, c.OutputTokens - o.OutputTokens}
}

// Sample is Counters read at a time, with the requests in flight then.
type Sample struct {
	At time.Time
	Counters
	InFlight float64
}

// CountersAt interpolates the counters at t between the samples around it
// (linearly: admissions between two samples a fraction of a second apart
// are spread evenly). ok is false when t is outside the samples. samples
// must be sorted by At.
func CountersAt(samples []Sample, t time.Time) (Counters, bool) {
	if len(samples) == 0 || t.Before(samples[0].At) || t.After(samples[len(samples)-1].At) {
		return Counters{}, false
	}
	i, found := slices.BinarySearchFunc(samples, t, func(s Sample, t time.Time) int { return s.At.Compare(t) })
	if found {
		return samples[i].Counters, true
	}
	a, b := samples[i-1], samples[i]
	f := float64(t.Sub(a.At)) / float64(b.At.Sub(a.At))
	lerp := func(x, y float64) float64 { return x + f*(y-x) }
	return Counters{lerp(a.Requests, b.Requests), lerp(a.InputTokens, b.InputTokens), lerp(a.OutputTokens, b.OutputTokens)}, true
}

// LastAdmission is when the upstream admitted its last request: the first
// sample whose request counter shows its final value (so at most one
// sampling interval late, which only lengthens a window). ok is false
// without samples or when nothing was admitted after the first one.
func LastAdmission(samples []Sample) (time.Time, bool) {
	if len(samples) < 2 {
		return time.Time{}, false
	}
	final := samples[len(samples)-1].Requests
	if samples[0].Requests == final {
		return time.Time{}, false
	}
	for _, s := range samples {
		if s.Requests == final {
			return s.At, true
		}
	}
	return time.Time{}, false // not reached: the last sample has the final value
}

// ServedIn are the amounts of the jobs started in w, each counted at its
// start: the gateway's own view of what it sent upstream, for when the
// upstream's counters are not available.
func ServedIn(jobs []Job, w Window) Counters {
	var c Counters
	for _, j := range jobs {
		if j.Started() && w.Contains(j.StartedAt) {
			c.Requests++
			c.InputTokens += float64(j.Input)
			c.OutputTokens += float64(j.Output)
		}
	}
	return c
}

// MeanInFlight is the mean of the in-flight readings taken in w (Start
// and End included): the upstream's average concurrency, sampled. ok is
// false when no reading falls in w.
func MeanInFlight(samples []Sample, w Window) (mean float64, ok bool) {
	n := 0
	for _, s := range samples {
		if !s.At.Before(w.Start) && !s.At.After(w.End) {
			mean += s.InFlight
			n++
		}
	}
	if n == 0 {
		return 0, false
	}
	return mean / float64(n), true
}

// Limits are the per-minute limits (and the concurrency cap) that
// utilization is measured against.
type Limits struct {
	RPM            int `json:"rpm"`
	InputTPM       int `json:"input_tpm"`
	OutputTPM      int `json:"output_tpm"`
	MaxConcurrency int `json:"max_concurrency"`
}

// Dimension names, as in Limits' JSON.
const (
	DimRPM         = "rpm"
	DimInputTPM    = "input_tpm"
	DimOutputTPM   = "output_tpm"
	DimConcurrency = "max_concurrency"
)

// Fractions are the achieved rates as fractions of each limit, and the
// dimension that came closest to its limit.
type Fractions struct {
	RPM         float64
	InputTPM    float64
	OutputTPM   float64
	Concurrency float64 // mean in flight / max_concurrency; -1 if unknown
	Binding     string  // DimRPM, DimInputTPM, DimOutputTPM or DimConcurrency
	// PerMinute are the achieved rates.
	PerMinute Counters
}

// Utilize divides what was admitted in a window of length d by what the
// limits allow in d (limit × minutes), and names the binding dimension:
// the dimension with the highest fraction: a per-minute limit, or the
// concurrency cap (mean in flight / max_concurrency; meanInFlight < 0
// leaves it out) when calls in flight fill it more than any per-minute
// limit is used, as when long answers hold every slot.
func Utilize(delta Counters, d time.Duration, meanInFlight float64, l Limits) Fractions {
	mins := d.Minutes()
	if mins <= 0 {
		return Fractions{Concurrency: -1}
	}
	perMin := Counters{delta.Requests / mins, delta.InputTokens / mins, delta.OutputTokens / mins}
	frac := func(v float64, limit int) float64 {
		if limit <= 0 {
			return 0
		}
		return v / float64(limit)
	}
	f := Fractions{
		RPM:         frac(perMin.Requests, l.RPM),
		InputTPM:    frac(perMin.InputTokens, l.InputTPM),
		OutputTPM:   frac(perMin.OutputTokens, l.OutputTPM),
		Concurrency: -1,
		PerMinute:   perMin,
	}
	best := f.RPM
	f.Binding = DimRPM
	if f.InputTPM > best {
		f.Binding, best = DimInputTPM, f.InputTPM
	}
	if f.OutputTPM > best {
		f.Binding, best = DimOutputTPM, f.OutputTPM
	}
	if meanInFlight >= 0 && l.MaxConcurrency > 0 {
		f.Concurrency = meanInFlight / float64(l.MaxConcurrency)
		// Calls in flight bind when they fill max_concurrency more than
		// any per-minute limit is used.
		if f.Concurrency > best {
			f.Binding = DimConcurrency
		}
	}
	return f
}

// ClockOffset estimates sluice's clock minus ours from submissions: the
// median of CreatedAt − the midpoint of the request, over pairs
// (sent, answered, created). Zero without data.
func ClockOffset(sent, answered, created []time.Time) time.Duration {
	var ds []time.Duration
	for i := range created {
		mid := sent[i].Add(answered[i].Sub(sent[i]) / 2)
		ds = append(ds, created[i].Sub(mid))
	}
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return ds[len(ds)/2]
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
