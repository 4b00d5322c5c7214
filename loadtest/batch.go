package loadtest

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// The user classes of batch's two passes (the report's labels).
const (
	passInteractive = "interactive"
	passBatch       = "batch"
)

// batchPass is one pass of batch as the run made it.
type batchPass struct {
	name     string // passInteractive or passBatch
	service  string // the jobs' service class
	deadline int    // their deadline_seconds; 0 = none
	// before and after are the fake's counters at the pass's start and
	// once its jobs were done; nil without the fake (or unreadable).
	before, after *fakeStats
	timedOut      bool
}

// batch sends the same jobs twice: as interactive jobs, then, once those
// are done, as background jobs with a deadline that lets them wait for a
// Message Batch.
func (r *runner) batch(ctx context.Context) (scenarioResult, error) {
	o := r.o
	type job struct{ user, prompt string }
	var plan []job
	for range o.RequestsPerUser {
		for u := range o.Users {
			plan = append(plan, job{fmt.Sprintf("writer-%02d", u+1), r.promptText()})
		}
	}
	deadline := int(BatchDeadline / time.Second)
	passes := []batchPass{
		{name: passInteractive, service: "interactive"},
		{name: passBatch, service: "background", deadline: deadline},
	}
	r.progress("batch: %d users × %d jobs, twice: as interactive jobs, then as background jobs with deadline_seconds %d",
		o.Users, o.RequestsPerUser, deadline)
	timedOut := false
	for i := range passes {
		p := &passes[i]
		p.before = r.fakeSnapshot(ctx)
		t0 := o.Now()
		sem := make(chan struct{}, submitParallel)
		var wg sync.WaitGroup
		for _, j := range plan {
			if ctx.Err() != nil {
				break
			}
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				r.submitBody(ctx, p.name, submitBody{UserID: j.user, Class: p.service, DeadlineSeconds: p.deadline,
					Request: messageRequest{Model: o.Model, MaxTokens: o.MaxTokens, Messages: []message{{Role: "user", Content: j.prompt}}}})
			})
		}
		wg.Wait()
		if err := r.failed(); err != nil {
			return scenarioResult{}, err
		}
		if ctx.Err() != nil {
			return scenarioResult{}, ctx.Err()
		}
		r.progress("batch: %s pass: %d jobs submitted in %.1fs; waiting for them to finish (timeout %s)",
			p.name, len(plan), o.Now().Sub(t0).Seconds(), o.Timeout)
		p.timedOut = r.waitDone(ctx, o.Now().Add(o.Timeout), func(s *submission) bool { return s.class == p.name })
		p.after = r.fakeSnapshot(ctx)
		timedOut = timedOut || p.timedOut
		r.progress("batch: %s pass done in %.1fs", p.name, o.Now().Sub(t0).Seconds())
	}
	return scenarioResult{
		load: map[string]any{"users": o.Users, "jobs_per_user": o.RequestsPerUser, "jobs_per_pass": len(plan),
			"batch_deadline_seconds": deadline},
		timedOut: timedOut,
		passes:   passes,
	}, nil
}

// fakeSnapshot reads the fake's counters; nil without the fake or when
// they cannot be read (noted).
func (r *runner) fakeSnapshot(ctx context.Context) *fakeStats {
	if r.fake == nil {
		return nil
	}
	st, err := r.fake.stats(ctx)
	if err != nil {
		r.mu.Lock()
		if r.fakeErr == nil && ctx.Err() == nil {
			r.fakeErr = err
		}
		r.mu.Unlock()
		return nil
	}
	return &st
}

// BatchOffload compares batch's two passes: the same jobs sent as
// interactive jobs (the Messages API) and as background jobs that can wait
// for a Message Batch.
type BatchOffload struct {
	Interactive BatchPass `json:"interactive"`
	Batch       BatchPass `json:"batch"`
	// CostRatio is the batch pass's cost over the interactive pass's: the
	// batch discount when every job of the batch pass went by batch (0.5
	// at the shipped prices). Null when the interactive pass has no cost.
	CostRatio *float64 `json:"cost_ratio"`
}

// BatchPass are one pass's figures.
type BatchPass struct {
	ServiceClass    string `json:"service_class"`
	DeadlineSeconds int    `json:"deadline_seconds"`
	// Jobs counts the pass's accepted jobs; Succeeded those that
	// succeeded.
	Jobs      int `json:"jobs"`
	Succeeded int `json:"succeeded"`
	// DispatchedVia counts the jobs by how they went upstream
	// ("messages", "batch"; "none" for jobs never sent).
	DispatchedVia map[string]int `json:"dispatched_via"`
	// BatchIDs counts the distinct Message Batches the jobs name.
	BatchIDs int `json:"batch_ids"`
	// UpstreamBatches, UpstreamBatchRequests and MessagesCalls are what
	// the fake upstream saw during the pass: Message Batches created, the
	// requests in them, and Messages API calls. Null without the fake.
	UpstreamBatches       *int64 `json:"upstream_batches"`
	UpstreamBatchRequests *int64 `json:"upstream_batch_requests"`
	MessagesCalls         *int64 `json:"messages_calls"`
	// CostUSD is the jobs' cost_usd summed; JobsCosted counts the jobs
	// that had one.
	CostUSD    float64 `json:"cost_usd"`
	JobsCosted int     `json:"jobs_costed"`
	// WallSeconds runs from the pass's first created_at to its last
	// finished_at (sluice's clock); null when no job finished.
	WallSeconds *float64 `json:"wall_seconds"`
}

// batchOffload computes batch's figures from the passes and the jobs'
// last views (r.mu held).
func (r *runner) batchOffload(rep *Report, sc scenarioResult) *BatchOffload {
	if len(sc.passes) != 2 {
		return nil
	}
	costs := map[string]float64{}
	pass := func(p batchPass) BatchPass {
		bp := BatchPass{ServiceClass: p.service, DeadlineSeconds: p.deadline, DispatchedVia: map[string]int{}}
		batches := map[string]bool{}
		var first, last time.Time
		for _, s := range r.subs {
			if s.class != p.name {
				continue
			}
			v := s.view
			bp.Jobs++
			if v.Status == "succeeded" {
				bp.Succeeded++
			}
			bp.DispatchedVia[orText(v.DispatchedVia, "none")]++
			if v.BatchID != "" {
				batches[v.BatchID] = true
			}
			if v.CostUSD != nil {
				bp.JobsCosted++
				costs[p.name] += *v.CostUSD
			}
			if first.IsZero() || v.CreatedAt.Before(first) {
				first = v.CreatedAt
			}
			if v.FinishedAt != nil && v.FinishedAt.After(last) {
				last = *v.FinishedAt
			}
		}
		bp.BatchIDs = len(batches)
		bp.CostUSD = round(costs[p.name], 6)
		if !last.IsZero() {
			w := round(last.Sub(first).Seconds(), 2)
			bp.WallSeconds = &w
		}
		if a, b := p.before, p.after; a != nil && b != nil {
			batchesN, reqs, calls := b.Batches-a.Batches, b.BatchRequests-a.BatchRequests, b.Requests-a.Requests
			bp.UpstreamBatches, bp.UpstreamBatchRequests, bp.MessagesCalls = &batchesN, &reqs, &calls
		}
		if bp.JobsCosted < bp.Jobs {
			rep.note("%s pass: %d of %d jobs have no cost_usd (not sent, or a model without a price): its cost covers the others", p.name, bp.Jobs-bp.JobsCosted, bp.Jobs)
		}
		if p.timedOut {
			rep.note("%s pass: the wait for its jobs timed out; the upstream counts of the pass that follows may include its late calls", p.name)
		}
		return bp
	}
	b := &BatchOffload{Interactive: pass(sc.passes[0]), Batch: pass(sc.passes[1])}
	if c := costs[passInteractive]; c > 0 {
		ratio := round(costs[passBatch]/c, 4)
		b.CostRatio = &ratio
	}
	if n := b.Batch.Jobs - b.Batch.DispatchedVia["batch"]; n > 0 {
		rep.note("%d of the batch pass's %d jobs did not go by batch (%s): a job goes by batch only when its model group has batch: true and its deadline_seconds (%d) is at least the group's batch_slack",
			n, b.Batch.Jobs, countsText(b.Batch.DispatchedVia), sc.passes[1].deadline)
	}
	if b.Interactive.UpstreamBatches == nil {
		rep.note("batch_offload: without the fake's counters the upstream's batches and Messages calls per pass are unknown")
	}
	rep.note("batch_offload: the same %d jobs (same users, prompts and max_tokens) ran twice, the batch pass once the interactive one was done; a pass's wall time runs from its first submission to its last finish (sluice's clock); the batch pass's is batch_window plus the upstream's processing time (in-process: the fake's --batch-delay; the Message Batches API takes minutes to 24 h)",
		b.Interactive.Jobs)
	if b.Interactive.UpstreamBatches != nil {
		rep.note("utilization counts the Messages API's admissions (the interactive pass): batch requests are outside its rate limits")
	}
	return b
}

// writeBatchOffload writes the batch section of the table.
func writeBatchOffload(b *strings.Builder, bo *BatchOffload) {
	fmt.Fprintf(b, "\nbatch offload: the same %d jobs as interactive jobs, then as background jobs that can wait for a batch\n", bo.Interactive.Jobs)
	tw := tabwriter.NewWriter(b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "  pass\tjobs\tsucceeded\tdispatched via\tbatches (requests)\tmessages calls\tcost USD\twall s\t\n")
	count := func(v *int64) string {
		if v == nil {
			return "?"
		}
		return fmt.Sprint(*v)
	}
	for _, p := range []struct {
		name string
		p    BatchPass
	}{{passInteractive, bo.Interactive}, {passBatch, bo.Batch}} {
		var via []string
		for _, k := range slices.Sorted(maps.Keys(p.p.DispatchedVia)) {
			via = append(via, fmt.Sprintf("%s %d", k, p.p.DispatchedVia[k]))
		}
		wall := "-"
		if p.p.WallSeconds != nil {
			wall = fmt.Sprintf("%.1f", *p.p.WallSeconds)
		}
		fmt.Fprintf(tw, "  %s\t%d\t%d\t%s\t%s (%s)\t%s\t%.6f\t%s\t\n", p.name, p.p.Jobs, p.p.Succeeded, strings.Join(via, ", "),
			count(p.p.UpstreamBatches), count(p.p.UpstreamBatchRequests), count(p.p.MessagesCalls), p.p.CostUSD, wall)
	}
	tw.Flush()
	if bo.CostRatio != nil {
		fmt.Fprintf(b, "  cost batch / interactive: %.3f (target ~0.50: the batch discount)\n", *bo.CostRatio)
	} else {
		b.WriteString("  cost batch / interactive: unknown (the interactive pass has no cost)\n")
	}
}
