package loadtest

import (
	"cmp"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Report is the outcome of a run. Its JSON (snake_case) is the machine
// interface of `sluice loadtest --json`; a null figure could not be
// measured (the notes say why).
type Report struct {
	Scenario string `json:"scenario"`
	// Target is what was measured: "in-process" or sluice's URL.
	Target          string         `json:"target"`
	StartedAt       time.Time      `json:"started_at"`
	DurationSeconds float64        `json:"duration_seconds"`
	Limits          Limits         `json:"limits"`
	Load            map[string]any `json:"load"`
	// JobsSubmitted counts every POST /v1/jobs; JobsAccepted the 202s.
	JobsSubmitted int `json:"jobs_submitted"`
	JobsAccepted  int `json:"jobs_accepted"`
	// Refused counts the other answers by HTTP status and, where the body
	// names one, the error type ("429 queue_full": 3).
	Refused      map[string]int `json:"refused"`
	SubmitErrors int            `json:"submit_errors"`
	// FinalStatus counts the accepted jobs by their last status seen;
	// "not_found" for jobs sluice no longer knows.
	FinalStatus map[string]int `json:"final_status"`
	// JobsLost are accepted jobs that sluice answered 404 for, or that
	// were not finished when the wait ended (--timeout).
	JobsLost int `json:"jobs_lost"`
	// JobsUnfinished are jobs the run chose not to wait for
	// (heavy-vs-light's heavy backlog); they are not lost.
	JobsUnfinished int         `json:"jobs_unfinished"`
	Utilization    Utilization `json:"utilization"`
	// Upstream429 is the growth of the fake's rate_limited counter over
	// the run; null without the fake.
	Upstream429 *int64    `json:"upstream_429"`
	Upstream    *Upstream `json:"upstream"`
	// Cache are the prompt-cache figures of the run, from the fake's
	// counters; null without the fake.
	Cache *CacheFigures `json:"cache"`
	// JainIndex is Jain's fairness index over the served tokens of the
	// users backlogged for the whole fairness window; null when not
	// meaningful.
	JainIndex *float64        `json:"jain_index"`
	Fairness  *FairnessReport `json:"fairness"`
	// WaitSeconds are started_at − created_at per user class.
	WaitSeconds map[string]Summary `json:"wait_seconds"`
	// FinishSeconds are finished_at − created_at per user class: the whole
	// time a user waited for the answer (a gateway that starts jobs early
	// and retries after 429s has short waits and long finishes).
	FinishSeconds    map[string]Summary `json:"finish_seconds"`
	PositionAccuracy PositionAccuracy   `json:"position_accuracy"`
	// NewcomerMaxDispatchesBefore is, over heavy-vs-light's light users
	// (classes: its interactive users), the most other jobs that started
	// between a newcomer's submission and its start (target ≤ 2); null in
	// the other scenarios.
	NewcomerMaxDispatchesBefore *int       `json:"newcomer_max_dispatches_before"`
	Newcomers                   []Newcomer `json:"newcomers,omitempty"`
	// BackgroundShare is, in classes, the background jobs' share of the
	// jobs dispatched from the first interactive submission to the last
	// interactive start (both classes waiting); null otherwise.
	BackgroundShare *float64 `json:"background_share"`
	// BatchOffload compares batch's interactive and batch passes; null in
	// the other scenarios.
	BatchOffload *BatchOffload `json:"batch_offload"`
	Notes        []string      `json:"notes"`
}

// Utilization is the achieved rate of each dimension as a fraction of its
// limit over the measured window. Fractions may exceed 1 when the window
// includes the upstream's initial full bucket (see the notes).
type Utilization struct {
	RPM       *float64 `json:"rpm"`
	InputTPM  *float64 `json:"input_tpm"`
	OutputTPM *float64 `json:"output_tpm"`
	// MaxConcurrency is the upstream's mean requests in flight over the
	// window (the fake's in_flight, sampled) over max_concurrency; null
	// without the fake.
	MaxConcurrency *float64 `json:"max_concurrency"`
	// Binding is the dimension with the highest fraction: rpm, input_tpm,
	// output_tpm, or max_concurrency when calls in flight fill the cap
	// more than any per-minute limit is used.
	Binding string `json:"binding"`
	// Source is "fake" (the fake upstream's admitted counters) or "jobs"
	// (the jobs' own usage, counted at their start: the upstream unknown).
	Source        string             `json:"source"`
	WindowStart   *time.Time         `json:"window_start"`
	WindowEnd     *time.Time         `json:"window_end"`
	WindowSeconds float64            `json:"window_seconds"`
	WarmupSeconds float64            `json:"warmup_seconds"`
	PerMinute     map[string]float64 `json:"achieved_per_minute"`
}

// Upstream are the fake's counters over the run.
type Upstream struct {
	Requests int64            `json:"requests"`
	ByStatus map[string]int64 `json:"by_status"`
	// MaxInFlight is the fake's highest concurrency since it started or
	// was last reset (not only this run's, for a shared fake).
	MaxInFlight int64 `json:"max_in_flight"`
}

// CacheFigures are the prompt cache's share of the run's admitted input.
type CacheFigures struct {
	// ReadRatio is cache reads over all input (uncached, written, read);
	// null when no input was admitted.
	ReadRatio *float64 `json:"read_ratio"`
	// ChargedInputPerRequest is what each request admitted in the
	// utilization window charged the input limit on average (input + cache
	// writes, as the upstream counts them); ChargedInputPerRequestRun the
	// same over the whole run (the cold start's writes included).
	// UncachedInputPerRequest is what the scenario sends outside the
	// shared prefix per request: the floor once the prefix is cached.
	ChargedInputPerRequest    *float64 `json:"charged_input_per_request"`
	ChargedInputPerRequestRun *float64 `json:"charged_input_per_request_run"`
	UncachedInputPerRequest   float64  `json:"uncached_input_per_request"`
	// WriteRequests counts the requests that paid for writing the cache.
	WriteRequests int64 `json:"write_requests"`
	ReadTokens    int64 `json:"read_tokens"`
	WriteTokens   int64 `json:"write_tokens"`
}

// FairnessReport says over what Jain's index was computed.
type FairnessReport struct {
	WindowStart   time.Time `json:"window_start"`
	WindowEnd     time.Time `json:"window_end"`
	WindowSeconds float64   `json:"window_seconds"`
	Users         int       `json:"users"`
	Dispatches    int       `json:"dispatches"`
	// BestPossible is the highest index that whole jobs shared among
	// these users allow (each ⌊d/n⌋ or one more).
	BestPossible float64            `json:"best_possible"`
	ServedTokens map[string]float64 `json:"served_tokens"`
}

// Newcomer is one light user of heavy-vs-light (an interactive user of
// classes).
type Newcomer struct {
	User string `json:"user"`
	// DispatchesBefore is how many other jobs started between its
	// submission and its start.
	DispatchesBefore int `json:"dispatches_before"`
	// HeavyQueued is the backlog's queued jobs when it arrived (the heavy
	// user's; in classes, the background jobs).
	HeavyQueued int     `json:"heavy_queued"`
	Started     bool    `json:"started"`
	WaitSeconds float64 `json:"wait_seconds"`
}

// jobsOf turns the submissions into Jobs, Seq in submission order (sluice's
// created_at, then our send time), and returns the submissions in the same
// order.
func jobsOf(subs []*submission) ([]Job, []*submission) {
	subs = slices.Clone(subs)
	slices.SortStableFunc(subs, func(a, b *submission) int {
		return cmp.Or(a.view.CreatedAt.Compare(b.view.CreatedAt), a.sent.Compare(b.sent))
	})
	jobs := make([]Job, len(subs))
	for i, s := range subs {
		v := s.view
		j := Job{ID: v.ID, User: s.user, Class: s.class, Seq: i, Position: s.position,
			Status: v.Status, CreatedAt: v.CreatedAt}
		if s.notFound {
			j.Status = "not_found"
		}
		if v.StartedAt != nil {
			j.StartedAt = *v.StartedAt
		}
		if v.DispatchedAt != nil {
			j.DispatchedAt = *v.DispatchedAt
			j.DispatchSeq = v.DispatchSeq
		}
		if v.FinishedAt != nil {
			j.FinishedAt = *v.FinishedAt
		}
		if u := v.Usage; u != nil {
			j.HasUsage = true
			j.Input = u.InputTokens + u.CacheCreationInputTokens
			j.Output = u.OutputTokens
			j.Tokens = j.Input + j.Output
		}
		jobs[i] = j
	}
	return jobs, subs
}

// report computes every figure from the run's state.
func (r *runner) report(start, end time.Time, sc scenarioResult) *Report {
	r.mu.Lock()
	defer r.mu.Unlock()
	o := r.o
	rep := &Report{
		Scenario: o.Scenario, Target: o.Target, StartedAt: start.UTC(),
		DurationSeconds: round(end.Sub(start).Seconds(), 1),
		Limits:          o.Limits, Load: sc.load,
		JobsSubmitted: r.attempts, JobsAccepted: len(r.subs),
		Refused: map[string]int{}, SubmitErrors: r.submitErrs,
		FinalStatus: map[string]int{}, WaitSeconds: map[string]Summary{}, FinishSeconds: map[string]Summary{},
		Notes: []string{},
	}
	rep.Load["model"] = o.Model
	rep.Load["prompt_bytes"] = o.PromptBytes
	rep.Load["reply_tokens"] = o.ReplyTokens
	rep.Load["max_tokens"] = o.MaxTokens
	maps.Copy(rep.Refused, r.refused)
	if r.submitErrs > 0 {
		rep.note("%d submissions failed without an answer; the first: %s", r.submitErrs, r.firstErr)
	}

	jobs, subs := jobsOf(r.subs)
	// Our clock to sluice's: every window below is on sluice's clock.
	var sent, answered, created []time.Time
	for _, s := range subs {
		sent, answered, created = append(sent, s.sent), append(answered, s.answered), append(created, s.view.CreatedAt)
	}
	offset := ClockOffset(sent, answered, created)
	if offset.Abs() > 2*time.Second {
		rep.note("sluice's clock is %s ahead of this machine's (estimated from submissions); windows are converted", offset.Round(time.Millisecond))
	}
	horizon := end.Add(offset)

	// Final statuses, lost and unfinished jobs.
	for _, j := range jobs {
		rep.FinalStatus[j.Status]++
		switch {
		case j.Status == "not_found":
			rep.JobsLost++
		case terminal(j.Status):
		case sc.unfinishedOK != "" && j.Class == sc.unfinishedOK:
			rep.JobsUnfinished++
		default:
			rep.JobsLost++
		}
	}
	if sc.timedOut {
		rep.note("the wait for jobs to finish timed out after %s: unfinished jobs count as lost (they may only be slow)", o.Timeout)
	}
	if rep.JobsUnfinished > 0 {
		queued := 0
		for _, j := range jobs {
			if j.Class == sc.unfinishedOK && j.Status == "queued" {
				queued++
			}
		}
		_, newcomer := r.newcomerClasses()
		rep.note("the run stopped once the %s jobs were done: %d %s jobs were unfinished (%d still queued); they are not lost", newcomer, rep.JobsUnfinished, sc.unfinishedOK, queued)
	}

	// Waits per class.
	waits, finishes := map[string][]float64{}, map[string][]float64{}
	notStarted := map[string]int{}
	for _, j := range jobs {
		if j.Started() {
			waits[j.Class] = append(waits[j.Class], j.StartedAt.Sub(j.CreatedAt).Seconds())
		} else {
			notStarted[j.Class]++
		}
		if !j.FinishedAt.IsZero() {
			finishes[j.Class] = append(finishes[j.Class], j.FinishedAt.Sub(j.CreatedAt).Seconds())
		}
	}
	summarize := func(xs []float64) Summary {
		s := Summarize(xs)
		s.P50, s.P95, s.Max = round(s.P50, 3), round(s.P95, 3), round(s.Max, 3)
		return s
	}
	for class, xs := range waits {
		rep.WaitSeconds[class] = summarize(xs)
	}
	for class, xs := range finishes {
		rep.FinishSeconds[class] = summarize(xs)
	}
	for _, class := range slices.Sorted(maps.Keys(notStarted)) {
		rep.note("wait_seconds.%s covers started jobs only: %d never started", class, notStarted[class])
	}

	// Position accuracy.
	pa := MeasurePositions(jobs)
	pa.MeanAbsError, pa.ExactFraction = round(pa.MeanAbsError, 3), round(pa.ExactFraction, 3)
	pa.MeanAbsErrorInclLater = round(pa.MeanAbsErrorInclLater, 3)
	pa.MeanReported, pa.MeanActual = round(pa.MeanReported, 2), round(pa.MeanActual, 2)
	rep.PositionAccuracy = pa

	// Upstream counters.
	if r.firstFake != nil && r.lastFake != nil {
		n := r.lastFake.RateLimited - r.firstFake.RateLimited
		rep.Upstream429 = &n
		up := &Upstream{Requests: r.lastFake.Requests - r.firstFake.Requests, ByStatus: map[string]int64{},
			MaxInFlight: r.lastFake.MaxInFlight}
		for k, v := range r.lastFake.ByStatus {
			if d := v - r.firstFake.ByStatus[k]; d != 0 {
				up.ByStatus[k] = d
			}
		}
		rep.Upstream = up
		rep.Cache = r.cacheFigures()
	} else {
		rep.note("no fake upstream URL: upstream_429 is unknown and utilization comes from the jobs' own usage")
	}
	if r.fakeErr != nil {
		rep.note("reading the fake's counters failed at least once: %v", r.fakeErr)
	}

	r.utilization(rep, jobs, sc, offset, horizon)
	if c, pm := rep.Cache, rep.Utilization.PerMinute; c != nil && pm[DimRPM] > 0 {
		v := round(pm[DimInputTPM]/pm[DimRPM], 1)
		c.ChargedInputPerRequest = &v
	}
	r.fairness(rep, jobs, sc, offset, horizon)
	if o.Scenario == HeavyVsLight || o.Scenario == Classes {
		r.newcomers(rep, jobs)
	}
	if o.Scenario == Classes {
		r.backgroundShare(rep, jobs)
	}
	if o.Scenario == Batch {
		rep.BatchOffload = r.batchOffload(rep, sc)
	}
	return rep
}

// utilization fills rep.Utilization.
//
// The window: the upstream's buckets start full, holding one minute of
// each limit, so a window that begins with the load would count that
// minute's burst on top of the steady rate and could show well over 100%.
// Saturate measures its Duration after a Warmup (60 s by default: once the
// queue has been backlogged that long, whatever the buckets held has been
// spent, and from then on only the refill rate can be admitted). The
// other scenarios have work waiting from the first submission until the
// last dispatch (the fake's request counter reaching its final value: its
// last admission; without the fake, the last job's start): that stretch
// minus the same warm-up when at least 15 s remain, else all of it (and
// say so).
// Waiting work, not jobs in status queued, is what keeps a limit busy: a
// gateway that retries after 429s holds its waiting jobs as running.
func (r *runner) utilization(rep *Report, jobs []Job, sc scenarioResult, offset time.Duration, horizon time.Time) {
	o := r.o
	u := &rep.Utilization
	u.PerMinute = map[string]float64{}
	samples := make([]Sample, len(r.samples))
	for i, s := range r.samples {
		samples[i] = Sample{At: s.At.Add(offset), Counters: s.Counters, InFlight: s.InFlight}
	}
	slices.SortFunc(samples, func(a, b Sample) int { return a.At.Compare(b.At) })

	var w Window
	if o.Scenario == Saturate {
		w = Window{sc.measure.Start.Add(offset), sc.measure.End.Add(offset)}
		u.WarmupSeconds = o.Warmup.Seconds()
	} else {
		if len(jobs) == 0 {
			rep.note("no job was accepted: utilization not measured")
			return
		}
		active := ActiveWindow(jobs, horizon)
		demand := Window{Start: active.Start}
		if last, ok := LastAdmission(samples); ok {
			demand.End = last
		} else {
			for _, j := range jobs {
				if j.Started() && !j.StartedAt.Before(demand.End) {
					demand.End = j.StartedAt.Add(time.Millisecond) // windows are [start, end)
				}
			}
		}
		switch {
		case demand.Duration() >= o.Warmup+minMeasured:
			w = Window{demand.Start.Add(o.Warmup), demand.End}
			u.WarmupSeconds = o.Warmup.Seconds()
			rep.note("utilization covers the time work was waiting (first submission to last dispatch) minus its first %s: the upstream's buckets start full (one minute of each limit), so only after that does the admitted rate show what the refill allows", o.Warmup)
		default:
			w = demand
			rep.note("work was waiting for only %.1fs (first submission to last dispatch), too short for the %s warm-up: utilization covers all of it, including the upstream's initial full bucket, so fractions can exceed 1",
				demand.Duration().Seconds(), o.Warmup)
		}
		var longest time.Duration
		for _, j := range jobs {
			if !j.FinishedAt.IsZero() {
				longest = max(longest, j.FinishedAt.Sub(j.CreatedAt))
			}
		}
		if longest < minMeasured {
			rep.note("the work never piled up (no job took more than %.1fs from submission to finish): the rates show the offered load, not a limit", longest.Seconds())
		}
	}
	if w.Duration() <= 0 {
		rep.note("the utilization window is empty")
		return
	}
	ws, we := w.Start.UTC().Round(time.Millisecond), w.End.UTC().Round(time.Millisecond)
	u.WindowStart, u.WindowEnd, u.WindowSeconds = &ws, &we, round(w.Duration().Seconds(), 2)

	var delta Counters
	u.Source = "jobs"
	if len(samples) > 0 {
		a, okA := CountersAt(samples, w.Start)
		b, okB := CountersAt(samples, w.End)
		if okA && okB {
			delta, u.Source = b.Sub(a), "fake"
		}
	}
	if u.Source == "jobs" {
		delta = ServedIn(jobs, w)
	}
	inFlight, ok := MeanInFlight(samples, w)
	if !ok {
		inFlight = -1
	}
	f := Utilize(delta, w.Duration(), inFlight, o.Limits)
	p := func(v float64) *float64 { x := round(v, 4); return &x }
	u.RPM, u.InputTPM, u.OutputTPM = p(f.RPM), p(f.InputTPM), p(f.OutputTPM)
	if f.Concurrency >= 0 {
		u.MaxConcurrency = p(f.Concurrency)
	}
	u.Binding = f.Binding
	u.PerMinute[DimRPM] = round(f.PerMinute.Requests, 2)
	u.PerMinute[DimInputTPM] = round(f.PerMinute.InputTokens, 1)
	u.PerMinute[DimOutputTPM] = round(f.PerMinute.OutputTokens, 1)
	if o.Scenario == Saturate {
		rep.note("utilization covers the %s after a %s warm-up: the upstream's buckets start full (one minute of each limit), so only after that minute does the admitted rate show what the refill allows",
			o.Duration, o.Warmup)
	}
	if u.MaxConcurrency != nil {
		rep.note("utilization.max_concurrency is the fake's requests in flight (every group), read every %s and averaged over the window, over max_concurrency; it binds when it is fuller than every per-minute limit", sampleEvery)
	}
}

// fairness fills the Jain index.
func (r *runner) fairness(rep *Report, jobs []Job, sc scenarioResult, offset time.Duration, horizon time.Time) {
	var f Fairness
	switch r.o.Scenario {
	case HeavyVsLight, Classes:
		rep.note("jain_index is null for %s: each newcomer has one job, so no window has several users backlogged long enough to compare their service; see newcomer_max_dispatches_before", r.o.Scenario)
		return
	case Batch:
		rep.note("jain_index is null for batch: it compares how the same jobs go upstream and what they cost; see batch_offload")
		return
	case Saturate:
		w := Window{sc.measure.Start.Add(offset), sc.measure.End.Add(offset)}
		f = JainOver(jobs, w, horizon, "user")
		if f.OK {
			rep.note("jain_index: over the users queued for the whole measured window (%d of %d), their served tokens (input + cache writes + output) of jobs started in it",
				len(f.Users), r.o.Users)
		}
	case Classroom:
		var last time.Time
		for _, j := range jobs {
			last = maxTime(last, j.CreatedAt)
		}
		w, ok := BurstFairnessWindow(jobs, last, horizon, "student")
		if !ok {
			rep.note("jain_index is null: fewer than two students still had queued jobs when the last request arrived")
			return
		}
		f = JainOver(jobs, w, horizon, "student")
		if f.OK {
			rep.note("jain_index: from the last arrival until the median backlogged student ran out of queued jobs, over the %d students queued all that time; with few jobs each, compare with fairness.best_possible", len(f.Users))
		}
	}
	if !f.OK {
		rep.note("jain_index is null: fewer than two users were backlogged for the whole window, or none of them was served in it")
		return
	}
	idx := round(f.Index, 4)
	rep.JainIndex = &idx
	fr := &FairnessReport{
		WindowStart: f.Window.Start.UTC(), WindowEnd: f.Window.End.UTC(),
		WindowSeconds: round(f.Window.Duration().Seconds(), 2),
		Users:         len(f.Users), Dispatches: f.Dispatches,
		BestPossible: round(JainBestPossible(len(f.Users), f.Dispatches), 4),
		ServedTokens: map[string]float64{},
	}
	for i, u := range f.Users {
		fr.ServedTokens[u] = f.Served[i]
	}
	rep.Fairness = fr
}

// newcomers fills the heavy-vs-light and classes figures.
func (r *runner) newcomers(rep *Report, jobs []Job) {
	heavy, light := r.newcomerClasses()
	worst := -1
	for i, j := range jobs {
		if j.Class != light {
			continue
		}
		n, started := DispatchesBefore(jobs, i)
		nc := Newcomer{User: j.User, DispatchesBefore: n, HeavyQueued: Backlog(jobs, i, heavy), Started: started}
		if started {
			nc.WaitSeconds = round(j.StartedAt.Sub(j.CreatedAt).Seconds(), 3)
		}
		rep.Newcomers = append(rep.Newcomers, nc)
		worst = max(worst, n)
	}
	if worst >= 0 {
		rep.NewcomerMaxDispatchesBefore = &worst
	}
	behind, notStarted := 0, 0
	for _, nc := range rep.Newcomers {
		if nc.HeavyQueued > 0 {
			behind++
		}
		if !nc.Started {
			notStarted++
		}
	}
	rep.note("newcomers: %d of %d %s users arrived behind a queued %s backlog; a dispatch counts if it started at or after the %s job's created_at and before its start (same-millisecond starts count against the newcomer)",
		behind, len(rep.Newcomers), light, heavy, light)
	if notStarted > 0 {
		rep.note("%d %s jobs never started: their dispatches_before are lower bounds", notStarted, light)
	}
}

// backgroundShare fills classes' background share: of the jobs dispatched
// while interactive newcomers came (from the first one's submission to
// the last one's start), the part that was background.
func (r *runner) backgroundShare(rep *Report, jobs []Job) {
	var from, to time.Time
	for _, j := range jobs {
		if j.Class != "interactive" || !j.Started() {
			continue
		}
		if from.IsZero() || j.CreatedAt.Before(from) {
			from = j.CreatedAt
		}
		if j.dispatchTime().After(to) {
			to = j.dispatchTime()
		}
	}
	if from.IsZero() {
		return
	}
	all, bg := 0, 0
	for _, j := range jobs {
		if !j.Started() || j.dispatchTime().Before(from) || j.dispatchTime().After(to) {
			continue
		}
		all++
		if j.Class == "background" {
			bg++
		}
	}
	if all == 0 {
		return
	}
	share := round(float64(bg)/float64(all), 3)
	rep.BackgroundShare = &share
	rep.note("background_share: %d of the %d jobs dispatched from the first interactive submission to the last interactive start were background", bg, all)
}

func (rep *Report) note(format string, args ...any) {
	rep.Notes = append(rep.Notes, fmt.Sprintf(format, args...))
}

// round rounds x to d decimals; NaN and infinities become 0 (JSON has no
// room for them).
func round(x float64, d int) float64 {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return 0
	}
	p := math.Pow(10, float64(d))
	return math.Round(x*p) / p
}

// WriteTable writes the report for people.
func (rep *Report) WriteTable(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "sluice loadtest: %s against %s, %.1fs\n\n", rep.Scenario, rep.Target, rep.DurationSeconds)
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	l := rep.Limits
	fmt.Fprintf(tw, "limits\trpm %d\tinput_tpm %d\toutput_tpm %d\tmax_concurrency %d\n", l.RPM, l.InputTPM, l.OutputTPM, l.MaxConcurrency)
	var load []string
	for _, k := range slices.Sorted(maps.Keys(rep.Load)) {
		load = append(load, fmt.Sprintf("%s %v", k, rep.Load[k]))
	}
	fmt.Fprintf(tw, "load\t%s\n", strings.Join(load, ", "))
	fmt.Fprintf(tw, "jobs\tsubmitted %d\taccepted %d\trefused %s\tlost %d\tunfinished %d\n",
		rep.JobsSubmitted, rep.JobsAccepted, countsText(rep.Refused), rep.JobsLost, rep.JobsUnfinished)
	fmt.Fprintf(tw, "final status\t%s\n", countsText(rep.FinalStatus))
	if rep.Upstream429 != nil {
		fmt.Fprintf(tw, "upstream 429s\t%d\t(upstream requests %d, by status %s)\n", *rep.Upstream429, rep.Upstream.Requests, countsText(rep.Upstream.ByStatus))
	} else {
		fmt.Fprintf(tw, "upstream 429s\tunknown (no fake URL)\n")
	}
	if c := rep.Cache; c != nil && (c.ReadTokens > 0 || c.WriteTokens > 0 || cacheScenario(rep.Scenario)) {
		text := func(v *float64, format string) string {
			if v == nil {
				return "n/a"
			}
			return fmt.Sprintf(format, *v)
		}
		fmt.Fprintf(tw, "prompt cache\tread ratio %s\tinput charged per request %s in the window, %s over the run (uncached part %.0f)\trequests that wrote the cache %d\n",
			text(c.ReadRatio, "%.3f"), text(c.ChargedInputPerRequest, "%.0f"), text(c.ChargedInputPerRequestRun, "%.0f"), c.UncachedInputPerRequest, c.WriteRequests)
	}
	tw.Flush()
	if rep.BatchOffload != nil {
		writeBatchOffload(&b, rep.BatchOffload)
	}

	u := rep.Utilization
	fmt.Fprintf(&b, "\nutilization (source %s", orText(u.Source, "none"))
	if u.WindowStart != nil {
		fmt.Fprintf(&b, ", window %.1fs from %s, warm-up %.0fs", u.WindowSeconds, u.WindowStart.Format("15:04:05.000"), u.WarmupSeconds)
	}
	b.WriteString(")\n")
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "  dimension\tachieved/min\tlimit\tfraction\t\n")
	dims := []struct {
		name  string
		frac  *float64
		limit int
	}{{DimRPM, u.RPM, l.RPM}, {DimInputTPM, u.InputTPM, l.InputTPM}, {DimOutputTPM, u.OutputTPM, l.OutputTPM}, {DimConcurrency, u.MaxConcurrency, l.MaxConcurrency}}
	for _, d := range dims {
		ach := "-"
		if v, ok := u.PerMinute[d.name]; ok {
			ach = strconv.FormatFloat(v, 'f', 1, 64)
		}
		if d.name == DimConcurrency {
			ach = "(mean in flight)"
		}
		mark := ""
		if d.name == u.Binding {
			mark = " ← binding"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%d\t%s\t%s\n", d.name, ach, d.limit, pct(d.frac), mark)
	}
	tw.Flush()

	b.WriteString("\nfairness\n")
	if rep.JainIndex != nil {
		f := rep.Fairness
		fmt.Fprintf(&b, "  Jain's index %.4f over %d backlogged users, %d dispatches in %.1fs (best possible with whole jobs %.4f)\n",
			*rep.JainIndex, f.Users, f.Dispatches, f.WindowSeconds, f.BestPossible)
	} else {
		b.WriteString("  Jain's index: not measured (see notes)\n")
	}
	if rep.NewcomerMaxDispatchesBefore != nil {
		who := "light"
		if rep.Scenario == Classes {
			who = "interactive"
		}
		fmt.Fprintf(&b, "  newcomer: at most %d dispatches before a newcomer's (%s) job started (target ≤ 2)\n", *rep.NewcomerMaxDispatchesBefore, who)
		var ds []string
		for _, nc := range rep.Newcomers {
			s := strconv.Itoa(nc.DispatchesBefore)
			if !nc.Started {
				s += "+"
			}
			ds = append(ds, s)
		}
		fmt.Fprintf(&b, "  per %s user, in arrival order: %s\n", who, strings.Join(ds, " "))
	}
	if rep.BackgroundShare != nil {
		fmt.Fprintf(&b, "  background share: %.1f%% of the dispatches while interactive users came\n", *rep.BackgroundShare*100)
	}

	b.WriteString("\nwaits (s): wait = started_at − created_at, finish = finished_at − created_at\n")
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "  class\tstarted\twait p50\tp95\tmax\tfinished\tfinish p50\tp95\tmax\t\n")
	for _, c := range slices.Sorted(maps.Keys(rep.WaitSeconds)) {
		s, f := rep.WaitSeconds[c], rep.FinishSeconds[c]
		fmt.Fprintf(tw, "  %s\t%d\t%.2f\t%.2f\t%.2f\t%d\t%.2f\t%.2f\t%.2f\t\n", c, s.N, s.P50, s.P95, s.Max, f.N, f.P50, f.P95, f.Max)
	}
	tw.Flush()

	pa := rep.PositionAccuracy
	fmt.Fprintf(&b, "\nposition at submit vs actual rank (%d jobs)\n", pa.Jobs)
	fmt.Fprintf(&b, "  mean abs error %.2f, exact %.1f%%; mean reported %.1f vs actual %.1f; counting later arrivals that overtook: mean abs error %.2f\n",
		pa.MeanAbsError, 100*pa.ExactFraction, pa.MeanReported, pa.MeanActual, pa.MeanAbsErrorInclLater)

	if len(rep.Notes) > 0 {
		b.WriteString("\nnotes\n")
		for _, n := range rep.Notes {
			fmt.Fprintf(&b, "  - %s\n", n)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func pct(f *float64) string {
	if f == nil {
		return "unknown"
	}
	return strconv.FormatFloat(100**f, 'f', 1, 64) + "%"
}

func orText(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// countsText is "k1 n1, k2 n2" in key order, or "0".
func countsText[V int | int64](m map[string]V) string {
	if len(m) == 0 {
		return "0"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

// cacheFigures are the prompt-cache figures over the run, from the growth
// of the fake's counters (r.mu held).
func (r *runner) cacheFigures() *CacheFigures {
	a, b := r.firstFake, r.lastFake
	g := r.o.FakeGroup
	sum := func(m map[string]int64) int64 {
		var n int64
		for k, v := range m {
			if g == "" || k == g {
				n += v
			}
		}
		return n
	}
	read := sum(b.AdmittedCacheRead) - sum(a.AdmittedCacheRead)
	write := sum(b.AdmittedCacheWrite) - sum(a.AdmittedCacheWrite)
	charged := sum(b.AdmittedInputTokens) - sum(a.AdmittedInputTokens)
	reqs := sum(b.AdmittedRequests) - sum(a.AdmittedRequests)
	in, _ := r.jobTokens()
	c := &CacheFigures{UncachedInputPerRequest: float64(in), WriteRequests: sum(b.CacheWriteRequests) - sum(a.CacheWriteRequests),
		ReadTokens: read, WriteTokens: write}
	if all := charged + read; all > 0 {
		v := round(float64(read)/float64(all), 3)
		c.ReadRatio = &v
	}
	if reqs > 0 {
		v := round(float64(charged)/float64(reqs), 1)
		c.ChargedInputPerRequestRun = &v
	}
	return c
}
