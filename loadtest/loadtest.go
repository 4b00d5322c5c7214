// Package loadtest drives a running sluice over HTTP through named
// scenarios and measures what sluice promises: how close the upstream
// runs to its binding limit without a 429, how fairly backlogged users are
// served, how long each class of user waits, whether the position a job is
// told at submit comes true, and how soon a newcomer behind a big backlog
// starts.
//
// It treats sluice as a black box: jobs go in with POST /v1/jobs and are
// read back with GET /v1/jobs/{id}. Every comparison between a submission
// and a dispatch uses sluice's own created_at and started_at, so polling
// late never changes a figure, only when the run learns it. The upstream's
// side (admitted requests and tokens, 429s) comes from the fake upstream's
// GET /_fake/stats when its URL is known.
//
// Scenarios:
//
//   - classroom: Users students (default 30) each send RequestsPerUser
//     requests (default 5) at random moments within Spread (default 10 s).
//   - heavy-vs-light: one user submits HeavyJobs jobs (default 500), then
//     Users light users (default 20) arrive one after another, each with
//     one job: the next arrives when the previous light job has started (or
//     every LightInterval). The run stops once every light job is done.
//   - classes: heavy-vs-light with service classes: BackgroundUsers users
//     (4) share a backlog of HeavyJobs jobs (default 500) of class
//     "background" (an overnight grading run), then Users interactive
//     users (20) arrive one after another as in heavy-vs-light; the report
//     adds the background jobs' share of the dispatches while both waited.
//   - saturate: Users users (default 20) each keep a backlog of queued jobs
//     for Warmup + Duration (default 60 s + 2 min); the figures cover the
//     Duration after the warm-up.
//   - long-answers: saturate with answers of ReplyTokens (1,000) written
//     slowly and max_tokens 8,192, the output limit binding.
//   - cached-classroom: saturate where every job carries the same system
//     prompt of PrefixBytes (6,000 tokens) marked for prompt caching and a
//     short question of its own: once the prefix is cached a job costs the
//     input limit only its question.
//   - mixed-cache: saturate where half the users send that cached prefix
//     and the other half a system prompt of the same size that is new each
//     time (no caching), the input limit binding.
//   - batch: the same jobs twice, Users users (default 5) with
//     RequestsPerUser jobs each (default 20, max_tokens 1,024): first as
//     interactive jobs (the Messages API), then, once those are done, as
//     background jobs with a deadline of BatchDeadline (2 h), which a
//     model group with batch on sends through the Message Batches API.
//     The report compares the passes: how the jobs went upstream, the
//     batches and Messages calls the upstream saw, each pass's cost
//     (cost_usd summed) and wall time, and the cost ratio batch /
//     interactive (the batch discount: 0.5 at the shipped prices).
package loadtest

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Scenario names.
const (
	Classroom    = "classroom"
	HeavyVsLight = "heavy-vs-light"
	// Classes is heavy-vs-light with the backlog in the background service
	// class and the newcomers interactive.
	Classes  = "classes"
	Saturate = "saturate"
	// LongAnswers is saturate with long, slowly written answers and a
	// large max_tokens, so that the output limit binds (the loadtest
	// command presets its limits, answer length and speed).
	LongAnswers = "long-answers"
	// CachedClassroom is saturate with a shared, cached system prompt.
	CachedClassroom = "cached-classroom"
	// MixedCache is saturate with half the users caching a shared system
	// prompt and half sending uncached ones of the same size.
	MixedCache = "mixed-cache"
	// Batch runs the same jobs as interactive jobs and then as background
	// jobs that can wait for a Message Batch, and compares their cost.
	Batch = "batch"
)

// Scenarios lists the scenario names.
func Scenarios() []string {
	return []string{Classroom, HeavyVsLight, Classes, Saturate, LongAnswers, CachedClassroom, MixedCache, Batch}
}

// cacheScenario reports whether a scenario sends system prompts.
func cacheScenario(s string) bool { return s == CachedClassroom || s == MixedCache }

// Defaults for Options fields left zero.
const (
	DefaultModel           = "claude-sonnet-4-6"
	DefaultReplyTokens     = 100
	DefaultPromptBytes     = 400
	DefaultDuration        = 2 * time.Minute
	DefaultWarmup          = time.Minute
	DefaultTimeout         = 10 * time.Minute
	DefaultClassroomUsers  = 30
	DefaultRequestsPerUser = 5
	DefaultSpread          = 10 * time.Second
	DefaultHeavyJobs       = 500
	DefaultBackgroundUsers = 4
	DefaultLightUsers      = 20
	DefaultSaturateUsers   = 20
	DefaultPrefixBytes     = 24000 // 6,000 tokens as the fake counts them
	DefaultBatchUsers      = 5
	DefaultBatchJobs       = 20 // per user
	DefaultBatchMaxTokens  = 1024
	// BatchDeadline is the deadline of batch's background jobs: above the
	// batch_slack a job needs to go by batch (1 h by default).
	BatchDeadline = 2 * time.Hour
)

// NoWarmup as Options.Warmup measures from the first moment of backlog.
const NoWarmup time.Duration = -1

// Tuning of the run itself; none of them changes a figure, only how soon
// the run learns it.
const (
	pollEvery      = time.Second            // sweep of the unfinished jobs
	pollEveryFast  = 500 * time.Millisecond // the sweep while saturate steers its load
	lightPollEvery = 50 * time.Millisecond  // watching the one newest light job
	sampleEvery    = 500 * time.Millisecond // the fake's counters
	steerEvery     = 250 * time.Millisecond // saturate tops up backlogs
	getParallel    = 8                      // concurrent GETs of a sweep
	submitParallel = 16                     // concurrent POSTs
	progressEvery  = 10 * time.Second
	// saturateLag is how long each user's backlog must last at its fair
	// share of the binding limit while the run has not yet seen its
	// dispatches (a sweep or two).
	saturateLag = 10 * time.Second
	// minBacklog and maxBacklog bound each saturate user's queued jobs.
	minBacklog, maxBacklog = 3, 50
	// minMeasured is the shortest window worth measuring after a warm-up.
	minMeasured = 15 * time.Second
)

// Options configure Run.
type Options struct {
	Scenario string
	// BaseURL and Key reach sluice's API; Key is a tenant key.
	BaseURL string
	Key     string
	// FakeURL is the fake upstream's base URL; "" means the upstream is
	// unknown: no 429 count, utilization from the jobs' own usage.
	FakeURL string
	// FakeGroup is the fake's model group to read; "" sums every group.
	FakeGroup string
	// Model is the model every job asks for. Default DefaultModel.
	Model string
	// Limits are what utilization is measured against.
	Limits Limits
	// ReplyTokens is the reply length asked of the fake with
	// [[reply_tokens=N]]. Default 100.
	ReplyTokens int
	// MaxTokens is each job's max_tokens. Default ReplyTokens (batch:
	// DefaultBatchMaxTokens).
	MaxTokens int
	// PromptBytes is the length of each prompt, directive included, in
	// bytes. Default 400.
	PromptBytes int
	// PrefixBytes is the length of the system prompt of cached-classroom
	// and mixed-cache, in bytes. Default 24,000 (6,000 tokens).
	PrefixBytes int
	// Users: students (classroom), light users (heavy-vs-light) or users
	// (saturate, batch). Default 30, 20, 20, 5.
	Users int
	// RequestsPerUser and Spread shape classroom. Default 5 and 10 s.
	// In batch, RequestsPerUser is each user's jobs per pass (default 20).
	RequestsPerUser int
	Spread          time.Duration
	// HeavyJobs is the heavy user's backlog (classes: the background
	// users' together). Default 500.
	HeavyJobs int
	// BackgroundUsers share the background backlog of classes. Default 4.
	BackgroundUsers int
	// LightInterval spaces light users; 0 (the default) sends the next
	// one once the previous light job has started.
	LightInterval time.Duration
	// Duration is saturate's measured time, after Warmup. Default 2 min.
	Duration time.Duration
	// Warmup is how long the queue must have been backlogged before
	// utilization is measured (the upstream's buckets start full). Default
	// 60 s; NoWarmup for none.
	Warmup time.Duration
	// Timeout bounds the wait for jobs to finish after the submissions.
	// Default 10 min.
	Timeout time.Duration
	// Seed seeds arrival times and prompts. Default 1.
	Seed uint64
	// Target describes what is measured, for the report ("in-process" or
	// the URL).
	Target string
	// HTTPClient is used for every request. Default: a pooled client.
	HTTPClient *http.Client
	// Progress receives a line now and then; nil is silent.
	Progress io.Writer
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// withDefaults fills zero fields and checks the rest.
func (o Options) withDefaults() (Options, error) {
	var errs []error
	if !slices.Contains(Scenarios(), o.Scenario) {
		errs = append(errs, fmt.Errorf("scenario: want one of %s, got %q", strings.Join(Scenarios(), ", "), o.Scenario))
	}
	if o.BaseURL == "" {
		errs = append(errs, errors.New("the sluice URL is missing"))
	}
	if o.Key == "" {
		errs = append(errs, errors.New("the tenant key is missing"))
	}
	o.BaseURL = strings.TrimRight(o.BaseURL, "/")
	o.FakeURL = strings.TrimRight(o.FakeURL, "/")
	if o.Model == "" {
		o.Model = DefaultModel
	}
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defDur := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&o.ReplyTokens, DefaultReplyTokens)
	if o.Scenario == Batch {
		def(&o.MaxTokens, DefaultBatchMaxTokens)
	}
	def(&o.MaxTokens, o.ReplyTokens)
	def(&o.PromptBytes, DefaultPromptBytes)
	def(&o.PrefixBytes, DefaultPrefixBytes)
	switch o.Scenario {
	case Classroom:
		def(&o.Users, DefaultClassroomUsers)
	case HeavyVsLight, Classes:
		def(&o.Users, DefaultLightUsers)
	case Batch:
		def(&o.Users, DefaultBatchUsers)
		def(&o.RequestsPerUser, DefaultBatchJobs)
	default:
		def(&o.Users, DefaultSaturateUsers)
	}
	def(&o.RequestsPerUser, DefaultRequestsPerUser)
	defDur(&o.Spread, DefaultSpread)
	def(&o.HeavyJobs, DefaultHeavyJobs)
	def(&o.BackgroundUsers, DefaultBackgroundUsers)
	defDur(&o.Duration, DefaultDuration)
	switch {
	case o.Warmup == 0:
		o.Warmup = DefaultWarmup
	case o.Warmup < 0:
		o.Warmup = 0 // NoWarmup
	}
	defDur(&o.Timeout, DefaultTimeout)
	if o.Seed == 0 {
		o.Seed = 1
	}
	for name, v := range map[string]int{
		"users": o.Users, "requests-per-user": o.RequestsPerUser, "heavy-jobs": o.HeavyJobs, "background-users": o.BackgroundUsers,
		"reply-tokens": o.ReplyTokens, "max-tokens": o.MaxTokens, "prompt-bytes": o.PromptBytes, "prefix-bytes": o.PrefixBytes,
		"rpm": o.Limits.RPM, "input-tpm": o.Limits.InputTPM, "output-tpm": o.Limits.OutputTPM,
		"max-concurrency": o.Limits.MaxConcurrency,
	} {
		if v <= 0 {
			errs = append(errs, fmt.Errorf("%s: must be > 0, got %d", name, v))
		}
	}
	for name, v := range map[string]time.Duration{
		"spread": o.Spread, "duration": o.Duration, "timeout": o.Timeout,
	} {
		if v <= 0 {
			errs = append(errs, fmt.Errorf("%s: must be > 0, got %s", name, v))
		}
	}
	if o.LightInterval < 0 {
		errs = append(errs, errors.New("light-interval must not be negative"))
	}
	if o.HTTPClient == nil {
		o.HTTPClient = &http.Client{
			Timeout:   30 * time.Second,
			Transport: &http.Transport{MaxIdleConns: 128, MaxIdleConnsPerHost: 64, IdleConnTimeout: 30 * time.Second},
		}
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Target == "" {
		o.Target = o.BaseURL
	}
	return o, errors.Join(errs...)
}

// submission is one POST /v1/jobs that sluice accepted.
type submission struct {
	user, class    string
	sent, answered time.Time // our clock
	position       int       // at submit; 0 if none
	view           jobView   // the latest read; guarded by runner.mu
	notFound       bool      // a GET answered 404: the job is lost
}

// runner holds one run's state.
type runner struct {
	o    Options
	api  *sluiceClient
	fake *fakeClient

	mu         sync.Mutex
	rng        *rand.Rand
	subs       []*submission
	attempts   int
	refused    map[string]int // by status and error type: "429 queue_full"
	submitErrs int
	fatal      error // the first submission failed in a way retrying cannot fix
	firstErr   string
	samples    []Sample // the fake's counters, our clock
	shared     string   // the cached system prompt of the cache scenarios
	firstFake  *fakeStats
	lastFake   *fakeStats
	fakeErr    error
}

// Run drives sluice through o.Scenario and reports the figures. It returns
// an error only when the run could not be made at all (bad options, sluice
// refusing the first job outright, the fake's stats unreadable at start,
// ctx canceled); everything else is a figure or a note in the report.
func Run(ctx context.Context, o Options) (*Report, error) {
	ownClient := o.HTTPClient == nil
	o, err := o.withDefaults()
	if err != nil {
		return nil, err
	}
	if ownClient {
		defer o.HTTPClient.CloseIdleConnections() // leave no keep-alive goroutines behind
	}
	r := &runner{
		o:       o,
		api:     &sluiceClient{http: o.HTTPClient, base: o.BaseURL, key: o.Key},
		rng:     rand.New(rand.NewPCG(o.Seed, o.Seed^0x9e3779b97f4a7c15)),
		refused: map[string]int{},
	}
	if cacheScenario(o.Scenario) {
		r.shared = r.randomText(o.PrefixBytes)
	}
	if o.FakeURL != "" {
		r.fake = &fakeClient{http: o.HTTPClient, base: o.FakeURL}
		if _, err := r.sampleFake(ctx); err != nil {
			return nil, err
		}
	}
	start := o.Now()

	// The fake's counters every sampleEvery, until the run ends.
	sctx, stopSampling := context.WithCancel(ctx)
	var sampling sync.WaitGroup
	if r.fake != nil {
		sampling.Go(func() {
			t := time.NewTicker(sampleEvery)
			defer t.Stop()
			for {
				select {
				case <-sctx.Done():
					return
				case <-t.C:
					_, _ = r.sampleFake(sctx)
				}
			}
		})
	}

	var sc scenarioResult
	switch o.Scenario {
	case Classroom:
		sc, err = r.classroom(ctx)
	case HeavyVsLight, Classes:
		sc, err = r.heavyVsLight(ctx)
	case Saturate, LongAnswers, CachedClassroom, MixedCache:
		sc, err = r.saturate(ctx)
	case Batch:
		sc, err = r.batch(ctx)
	}
	stopSampling()
	sampling.Wait()
	if err != nil {
		return nil, err
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if r.fake != nil {
		_, _ = r.sampleFake(context.WithoutCancel(ctx))
	}
	end := o.Now()
	return r.report(start, end, sc), nil
}

// scenarioResult is what a scenario tells the report beyond the jobs.
type scenarioResult struct {
	load     map[string]any
	timedOut bool
	// measure is saturate's measured window, on our clock; zero for the
	// other scenarios, whose window follows from the jobs.
	measure Window
	// unfinishedOK names the class whose unfinished jobs are not lost
	// (heavy-vs-light's heavy user, left behind on purpose).
	unfinishedOK string
	// passes are batch's two passes, in order.
	passes []batchPass
}

// sampleFake reads the fake's counters and keeps them, timed at the
// middle of the request.
func (r *runner) sampleFake(ctx context.Context) (at time.Time, err error) {
	sent := r.o.Now()
	st, err := r.fake.stats(ctx)
	at = sent.Add(r.o.Now().Sub(sent) / 2)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		if r.fakeErr == nil && ctx.Err() == nil {
			r.fakeErr = err
		}
		return at, err
	}
	if r.firstFake == nil {
		r.firstFake = &st
	}
	r.lastFake = &st
	r.samples = append(r.samples, Sample{At: at, Counters: st.counters(r.o.FakeGroup), InFlight: float64(st.InFlight)})
	return at, nil
}

func (r *runner) progress(format string, args ...any) {
	fmt.Fprintf(r.o.Progress, "loadtest: "+format+"\n", args...)
}

// promptText is a prompt of PromptBytes bytes (at least the directive)
// ending in the reply-length directive, its words drawn from the seed.
func (r *runner) promptText() string {
	directive := fmt.Sprintf(" [[reply_tokens=%d]]", r.o.ReplyTokens)
	return r.randomText(max(0, r.o.PromptBytes-len(directive))) + directive
}

// randomText is n bytes of lower-case words drawn from the seed.
func (r *runner) randomText(n int) string {
	var b strings.Builder
	b.Grow(n)
	r.mu.Lock()
	defer r.mu.Unlock()
	for b.Len() < n {
		if w := b.Len(); w > 0 && r.rng.IntN(6) == 0 && w < n-1 {
			b.WriteByte(' ')
			continue
		}
		b.WriteByte(byte('a' + r.rng.IntN(26)))
	}
	return b.String()
}

// jobTokens are one job's input tokens as the fake counts them (8 framing,
// ⌈bytes/4⌉ of the text, 4 for the one message), and its output tokens.
// In the cache scenarios the input is the job's uncached part on average
// (the question; mixed-cache's uncached users add their system prompt):
// what a job charges the input limit once the shared prefix is cached.
func (r *runner) jobTokens() (input, output int) {
	bytes := max(r.o.PromptBytes, len(fmt.Sprintf(" [[reply_tokens=%d]]", r.o.ReplyTokens)))
	input = 8 + (bytes+3)/4 + 4
	switch r.o.Scenario {
	case CachedClassroom:
		input -= 8 // the framing is part of the cached prefix
	case MixedCache:
		// Half the jobs: the question only; half: all of it.
		input = ((input - 8) + (input + (r.o.PrefixBytes+3)/4)) / 2
	}
	return input, min(r.o.ReplyTokens, r.o.MaxTokens)
}

// classOf is the class of a saturate user: in mixed-cache every other user
// sends uncached system prompts.
func (r *runner) classOf(i int) string {
	switch {
	case r.o.Scenario == CachedClassroom:
		return "cached"
	case r.o.Scenario == MixedCache && i%2 == 0:
		return "cached"
	case r.o.Scenario == MixedCache:
		return "uncached"
	}
	return "user"
}

// system is the system prompt of a job of class: the shared prefix marked
// for caching, a new prompt of the same size, or none.
func (r *runner) system(class string) []systemBlock {
	switch class {
	case "cached":
		return []systemBlock{{Type: "text", Text: r.shared, CacheControl: &cacheControl{Type: "ephemeral"}}}
	case "uncached":
		return []systemBlock{{Type: "text", Text: r.randomText(r.o.PrefixBytes)}}
	}
	return nil
}

// submit posts one job for user, of the user class class (the report's
// label). It returns the submission if sluice accepted it.
func (r *runner) submit(ctx context.Context, user, class string) *submission {
	return r.submitIn(ctx, user, class, "")
}

// submitIn is submit with the job's service class ("" = sluice's default).
func (r *runner) submitIn(ctx context.Context, user, class, service string) *submission {
	return r.submitBody(ctx, class, submitBody{UserID: user, Class: service, Request: messageRequest{
		Model: r.o.Model, MaxTokens: r.o.MaxTokens, System: r.system(class),
		Messages: []message{{Role: "user", Content: r.promptText()}},
	}})
}

// submitBody posts body as a job of the user class class.
func (r *runner) submitBody(ctx context.Context, class string, body submitBody) *submission {
	user := body.UserID
	sent := r.o.Now()
	v, status, detail, err := r.api.submit(ctx, body)
	answered := r.o.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.attempts++
	switch {
	case err != nil:
		if ctx.Err() != nil {
			return nil
		}
		r.submitErrs++
		if r.firstErr == "" {
			r.firstErr = err.Error()
		}
		if len(r.subs) == 0 && r.fatal == nil {
			r.fatal = fmt.Errorf("submitting to %s: %w", r.o.BaseURL, err)
		}
		return nil
	case status == http.StatusAccepted:
		s := &submission{user: user, class: class, sent: sent, answered: answered, view: v}
		if v.Position != nil {
			s.position = *v.Position
		}
		r.subs = append(r.subs, s)
		return s
	default:
		r.refused[refusal(status, detail)]++
		if status != http.StatusTooManyRequests && status != http.StatusServiceUnavailable && len(r.subs) == 0 && r.fatal == nil {
			r.fatal = fmt.Errorf("sluice refused the job with %d: %s", status, detail)
		}
		return nil
	}
}

// refusal names a refused submission by its status and, when the body is
// sluice's error shape, the error type, so that a report tells which cap
// refused ("429 queue_full", "429 quota_exceeded", "503 upstream_unavailable").
func refusal(status int, body string) string {
	var e struct {
		Error struct {
			Type string `json:"type"`
		} `json:"error"`
	}
	if json.Unmarshal([]byte(body), &e) == nil && e.Error.Type != "" {
		return strconv.Itoa(status) + " " + e.Error.Type
	}
	return strconv.Itoa(status)
}

// failed returns the fatal error, if any.
func (r *runner) failed() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fatal
}

// pending returns the accepted submissions that are not finished (nor
// lost) and pass keep.
func (r *runner) pending(keep func(*submission) bool) []*submission {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*submission
	for _, s := range r.subs {
		if !s.notFound && !terminal(s.view.Status) && (keep == nil || keep(s)) {
			out = append(out, s)
		}
	}
	return out
}

// sweep reads every pending submission that passes keep once.
func (r *runner) sweep(ctx context.Context, keep func(*submission) bool) {
	subs := r.pending(keep)
	sem := make(chan struct{}, getParallel)
	var wg sync.WaitGroup
	for _, s := range subs {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			r.refresh(ctx, s)
		})
	}
	wg.Wait()
}

// refresh reads one job.
func (r *runner) refresh(ctx context.Context, s *submission) {
	r.mu.Lock()
	id := s.view.ID
	r.mu.Unlock()
	v, status, err := r.api.get(ctx, id)
	if err != nil {
		return // transient: the next sweep tries again
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	switch status {
	case http.StatusOK:
		s.view = v
	case http.StatusNotFound:
		s.notFound = true
	}
}

// waitDone sweeps the pending submissions that pass keep until none is
// left or the deadline passes; timedOut says which.
func (r *runner) waitDone(ctx context.Context, deadline time.Time, keep func(*submission) bool) (timedOut bool) {
	last := r.o.Now()
	for {
		r.sweep(ctx, keep)
		left := len(r.pending(keep))
		if left == 0 {
			return false
		}
		if ctx.Err() != nil || !r.o.Now().Before(deadline) {
			return ctx.Err() == nil
		}
		if now := r.o.Now(); now.Sub(last) >= progressEvery {
			last = now
			r.progress("%d jobs not finished yet", left)
		}
		wait(ctx, min(pollEvery, time.Until(deadline)))
	}
}

// wait waits d or until ctx ends.
func wait(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// classroom: students send requests at random moments within the spread.
func (r *runner) classroom(ctx context.Context) (scenarioResult, error) {
	o := r.o
	type arrival struct {
		at   time.Duration
		user string
	}
	var plan []arrival
	r.mu.Lock()
	for u := range o.Users {
		for range o.RequestsPerUser {
			plan = append(plan, arrival{time.Duration(r.rng.Int64N(int64(o.Spread))), fmt.Sprintf("student-%02d", u+1)})
		}
	}
	r.mu.Unlock()
	slices.SortFunc(plan, func(a, b arrival) int { return cmp.Compare(a.at, b.at) })
	r.progress("classroom: %d students × %d requests within %s", o.Users, o.RequestsPerUser, o.Spread)

	t0 := o.Now()
	sem := make(chan struct{}, submitParallel)
	var wg sync.WaitGroup
	for _, a := range plan {
		wait(ctx, time.Until(t0.Add(a.at)))
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			r.submit(ctx, a.user, "student")
		})
	}
	wg.Wait()
	if err := r.failed(); err != nil {
		return scenarioResult{}, err
	}
	r.progress("classroom: %d submitted in %.1fs; waiting for them to finish (timeout %s)", len(plan), o.Now().Sub(t0).Seconds(), o.Timeout)
	timedOut := r.waitDone(ctx, o.Now().Add(o.Timeout), nil)
	return scenarioResult{
		load:     map[string]any{"users": o.Users, "requests_per_user": o.RequestsPerUser, "spread_seconds": o.Spread.Seconds()},
		timedOut: timedOut,
	}, nil
}

// heavyVsLight: one user queues HeavyJobs jobs, then light users arrive one
// at a time with one job each. In classes the backlog is BackgroundUsers
// users' background jobs and the newcomers are interactive.
func (r *runner) heavyVsLight(ctx context.Context) (scenarioResult, error) {
	o := r.o
	heavy, light := r.newcomerClasses()
	// In classes the user classes are the service classes too.
	service := func(class string) string {
		if o.Scenario == Classes {
			return class
		}
		return ""
	}
	name := o.Scenario
	r.progress("%s: %d %s jobs", name, o.HeavyJobs, heavy)
	t0 := o.Now()
	for i := range o.HeavyJobs {
		if ctx.Err() != nil {
			return scenarioResult{}, ctx.Err()
		}
		user := "heavy"
		if o.Scenario == Classes {
			user = fmt.Sprintf("grader-%d", i%o.BackgroundUsers+1)
		}
		r.submitIn(ctx, user, heavy, service(heavy))
		if err := r.failed(); err != nil {
			return scenarioResult{}, err
		}
	}
	r.progress("%s: %d %s jobs submitted in %.1fs; now %d %s users, one at a time", name, o.HeavyJobs, heavy, o.Now().Sub(t0).Seconds(), o.Users, light)

	deadline := o.Now().Add(o.Timeout)
	isLight := func(s *submission) bool { return s.class == light }
	for i := range o.Users {
		s := r.submitIn(ctx, fmt.Sprintf("%s-%02d", light, i+1), light, service(light))
		if ctx.Err() != nil {
			return scenarioResult{}, ctx.Err()
		}
		if s == nil || i == o.Users-1 {
			continue
		}
		if o.LightInterval > 0 {
			wait(ctx, o.LightInterval)
			continue
		}
		// The next newcomer arrives once this one has started, so that
		// each meets the heavy backlog alone.
		for o.Now().Before(deadline) && ctx.Err() == nil {
			r.refresh(ctx, s)
			r.mu.Lock()
			started := s.view.StartedAt != nil || terminal(s.view.Status) || s.notFound
			r.mu.Unlock()
			if started {
				break
			}
			wait(ctx, lightPollEvery)
		}
	}
	r.progress("%s: waiting for the %s jobs to finish", name, light)
	timedOut := r.waitDone(ctx, deadline, isLight)
	// Where the heavy jobs stand, for the dispatch order; the run does
	// not wait for the rest of them.
	r.sweep(ctx, nil)
	load := map[string]any{"heavy_jobs": o.HeavyJobs, "light_users": o.Users,
		"light_interval_seconds": o.LightInterval.Seconds()}
	if o.Scenario == Classes {
		load = map[string]any{"background_jobs": o.HeavyJobs, "background_users": o.BackgroundUsers,
			"interactive_users": o.Users, "interactive_interval_seconds": o.LightInterval.Seconds()}
	}
	return scenarioResult{load: load, timedOut: timedOut, unfinishedOK: heavy}, nil
}

// newcomerClasses are the user classes of heavy-vs-light's backlog and
// newcomers; in classes, also their service classes.
func (r *runner) newcomerClasses() (backlog, newcomer string) {
	if r.o.Scenario == Classes {
		return "background", "interactive"
	}
	return "heavy", "light"
}

// saturate: every user keeps a backlog for Warmup + Duration.
func (r *runner) saturate(ctx context.Context) (scenarioResult, error) {
	o := r.o
	in, out := r.jobTokens()
	// The job rate the binding limit allows, per minute.
	rate := min(float64(o.Limits.RPM), float64(o.Limits.InputTPM)/float64(in), float64(o.Limits.OutputTPM)/float64(out))
	perUser := rate / float64(o.Users)
	backlog := min(max(int(math.Ceil(perUser*saturateLag.Minutes())), minBacklog), maxBacklog)
	// The first fill also covers one minute of the limit: the upstream's
	// buckets (and maybe sluice's) start full and may let that much
	// through at once.
	prefill := backlog + min(int(math.Ceil(perUser)), 100)
	users := make([]string, o.Users)
	class := map[string]string{}
	for i := range users {
		users[i] = fmt.Sprintf("user-%02d", i+1)
		class[users[i]] = r.classOf(i)
	}
	r.progress("saturate: %d users, %d queued jobs each (first fill %d), binding limit ≈ %.0f jobs/min; warm-up %s, measured %s",
		o.Users, backlog, prefill, rate, o.Warmup, o.Duration)

	t0 := o.Now()
	measure := Window{Start: t0.Add(o.Warmup), End: t0.Add(o.Warmup + o.Duration)}

	// Keep the views fresh while steering.
	pctx, stopPolling := context.WithCancel(ctx)
	var polling sync.WaitGroup
	polling.Go(func() {
		for pctx.Err() == nil {
			r.sweep(pctx, nil)
			wait(pctx, pollEveryFast)
		}
	})
	defer func() { stopPolling(); polling.Wait() }()

	// topUp submits, per user, what its backlog lacks; round robin over
	// users so none is always first.
	topUp := func(want int) {
		queued := map[string]int{}
		r.mu.Lock()
		for _, s := range r.subs {
			if s.view.StartedAt == nil && !terminal(s.view.Status) && !s.notFound {
				queued[s.user]++
			}
		}
		r.mu.Unlock()
		sem := make(chan struct{}, submitParallel)
		var wg sync.WaitGroup
		for round := 0; round < want; round++ {
			for _, u := range users {
				if queued[u]+round >= want {
					continue
				}
				sem <- struct{}{}
				wg.Go(func() {
					defer func() { <-sem }()
					r.submit(ctx, u, class[u])
				})
			}
		}
		wg.Wait()
	}

	topUp(prefill)
	if err := r.failed(); err != nil {
		return scenarioResult{}, err
	}
	// The measured window runs from the first reading after the warm-up
	// to the last one before the load stops; with a fake, both are
	// readings of its counters taken right then.
	measured := Window{}
	mark := func() time.Time {
		if r.fake != nil {
			if at, err := r.sampleFake(ctx); err == nil {
				return at
			}
		}
		return o.Now()
	}
	lastProgress := o.Now()
	for ctx.Err() == nil {
		now := o.Now()
		if measured.Start.IsZero() && !now.Before(measure.Start) {
			measured.Start = mark()
			r.progress("saturate: warm-up over; measuring for %s", o.Duration)
		}
		if !now.Before(measure.End) {
			break
		}
		if now.Sub(lastProgress) >= progressEvery {
			lastProgress = now
			r.mu.Lock()
			n := len(r.subs)
			r.mu.Unlock()
			r.progress("saturate: %d jobs submitted, %.0fs to go", n, measure.End.Sub(now).Seconds())
		}
		topUp(backlog)
		wait(ctx, min(steerEvery, time.Until(measure.End)))
	}
	measured.End = mark()
	stopPolling()
	polling.Wait()
	r.progress("saturate: load stopped; waiting for the queued jobs to finish (timeout %s)", o.Timeout)
	timedOut := r.waitDone(ctx, o.Now().Add(o.Timeout), nil)
	return scenarioResult{
		load: map[string]any{"users": o.Users, "backlog_per_user": backlog, "first_fill_per_user": prefill,
			"warmup_seconds": o.Warmup.Seconds(), "measured_seconds": o.Duration.Seconds()},
		timedOut: timedOut,
		measure:  measured,
	}, nil
}
