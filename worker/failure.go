package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/upstream"
)

// failedAttempt decides what an upstream failure means, and ends the
// attempt accordingly in one step: the job fails, or goes back to the front
// of its lane to run again. Every outcome settles the attempt's limiter
// reservation with what the upstream counted.
//
// Failures of the upstream's own (upstream.Error.Infra: refused or broken
// connections, no answer, 500/502/503/504/529) are not the request's: they
// do not use up its attempts, they count toward the group's outage rule,
// and while the group is in outage the job waits for the upstream's return
// (or its own deadline, or upstream.max_outage). Attempts count the
// failures that are the request's: a stream broken mid-answer, an answer
// that never completed in the attempt timeout.
func (w *Worker) failedAttempt(ctx context.Context, a *attempt, ue *upstream.Error, elapsed time.Duration) {
	job, g := a.Job, a.Group
	if ue.Header != nil || (ue.Status != 0 && !ue.Infra()) {
		w.observe(ctx, a, ue.Header, ue.Status != 0 && !ue.Infra())
	}
	if ue.Kind == upstream.KindCanceled {
		if ctx.Err() != nil {
			w.retry(a, ue, scheduler.Retry{Reason: "worker_stopped"}) // the process is stopping: hand the job back
			return
		}
		ue = &upstream.Error{Kind: upstream.KindRetryable, Started: ue.Started, Partial: ue.Partial,
			Message: fmt.Sprintf("the upstream call took longer than %s", w.d.Config.Upstream.AttemptTimeout), Err: ue}
	}
	a.log = a.log.With("upstream_status", ue.Status, "upstream_type", ue.Type, "request_id", ue.RequestID)
	if w.d.Usage != nil && (ue.Status == 429 || ue.Status == 529) {
		if uerr := w.d.Usage.Upstream(context.WithoutCancel(ctx), job.Group, job.Tenant, ue.Status); uerr != nil {
			a.log.Warn("could not count the upstream's pushback in the usage statistics", "err", uerr)
		}
	}
	switch ue.Kind {
	case upstream.KindFatal, upstream.KindSpendLimit:
		// Refused before any work: nothing counted upstream.
		w.fail(a, scheduler.Used{}, w.callTallies(job, jobs.Usage{}, 0, w.now()), *jobError(ue))
		return
	case upstream.KindRateLimited:
		kind := scheduler.Pushback429
		if ue.Code == "ramp_limit_exceeded" {
			kind = scheduler.PushbackRamp
		}
		until, ferr := w.d.Scheduler.Freeze(context.WithoutCancel(ctx), g, kind, ue.RetryAfter)
		if ferr != nil {
			a.log.Error("could not freeze the group", "err", ferr)
		}
		a.log.Warn("upstream rate limit: group frozen", "until", until.UTC())
		// A 429 is not admitted: nothing counted, no attempt used.
		w.retry(a, ue, scheduler.Retry{Delay: ue.RetryAfter, Tallies: w.callTallies(job, jobs.Usage{}, 0, w.now())})
		return
	}
	if ue.Status == 529 || ue.Type == "overloaded_error" {
		if _, ferr := w.d.Scheduler.Freeze(context.WithoutCancel(ctx), g, scheduler.Pushback529, ue.RetryAfter+time.Second); ferr != nil {
			a.log.Error("could not record overload", "err", ferr)
		}
	}
	if ue.Infra() {
		w.unavailable(a, ue)
		return
	}
	failures := job.Failures + 1
	if failures >= w.d.Config.Upstream.MaxAttempts {
		u, estimated := billed(ue, job)
		w.fail(a, used(ue, job), w.callTallies(job, u, estimated, w.now()), jobs.Error{Type: "upstream_unavailable", Message: fmt.Sprintf(
			"The Anthropic API failed %d times in a row for this request (last: %s). Please try again later.",
			failures, describe(ue))})
		return
	}
	delay := backoff(w.d.Config.Upstream.BackoffBase, w.d.Config.Upstream.BackoffMax, failures)
	w.retry(a, ue, scheduler.Retry{Delay: max(delay, ue.RetryAfter), Failures: failures})
}

// unavailable ends an attempt that failed for a reason of the upstream's
// own: the job goes back to the front of its lane, after a backoff of its
// own while the group is healthy and with none while the group is in
// outage (dispatch holds it then). It fails only once it has waited out
// the upstream longer than upstream.max_outage, or past its own deadline.
func (w *Worker) unavailable(a *attempt, ue *upstream.Error) {
	job := a.Job
	now := w.d.Clock()
	since := job.UnavailableSince
	if since.IsZero() {
		since = now
	}
	maxOutage := w.d.Config.Upstream.MaxOutage
	u, estimated := billed(ue, job)
	switch {
	case !job.DeadlineAt.IsZero() && !now.Before(job.DeadlineAt):
		w.fail(a, used(ue, job), w.callTallies(job, u, estimated, w.now()), jobs.Error{Type: "upstream_unavailable", Message: fmt.Sprintf(
			"The Anthropic API was unreachable or failing (last: %s) until this request's deadline passed, so it was given up. Please try again later.", describe(ue))})
		return
	case now.Sub(since) > maxOutage:
		w.fail(a, used(ue, job), w.callTallies(job, u, estimated, w.now()), jobs.Error{Type: "upstream_unavailable", Message: fmt.Sprintf(
			"The Anthropic API has been unreachable or failing for this request for longer than this service waits (%s; last: %s), so it was given up. Please try again later.",
			maxOutage, describe(ue))})
		return
	}
	n := job.InfraFailures + 1
	w.retry(a, ue, scheduler.Retry{
		Delay: backoff(w.d.Config.Upstream.BackoffBase, w.d.Config.Upstream.BackoffMax, n),
		Infra: true, Deadline: job.DeadlineAt,
		Fields: []string{"infra_failures", fmt.Sprint(n), "unavailable_since", jobs.MillisString(since)},
	})
}

// retry ends the attempt and queues the job again (r's Attempt, Used,
// Reason and Tallies are filled here when empty).
func (w *Worker) retry(a *attempt, ue *upstream.Error, r scheduler.Retry) {
	r.Attempt = a.Attempt
	if r.Reason == "" {
		r.Reason = ue.Reason()
	}
	if r.Used == (scheduler.Used{}) && ue.Kind != upstream.KindRateLimited {
		r.Used = used(ue, a.Job)
	}
	if r.Tallies == nil && reached(ue) {
		u, estimated := billed(ue, a.Job)
		r.Tallies = w.callTallies(a.Job, u, estimated, w.now())
	}
	a.log.Info("attempt failed; retrying", "reason", r.Reason, "retry_in", r.Delay.Round(time.Millisecond), "err", ue.Message)
	var health string
	err := w.persist(a, "the retry", func(ctx context.Context) error {
		var err error
		health, err = w.d.Scheduler.Retry(ctx, r)
		return err
	})
	switch {
	case err != nil && !refused(err):
		a.log.Error("could not queue the job again; its lease expiry will", "err", err)
	case health == scheduler.HealthEntered:
		a.log.Warn("the upstream is failing: the model group is in outage; dispatch stops and one probe at a time tests the upstream",
			"failures_in_a_row", a.Group.OutageFailures, "last", describe(ue))
	}
}

// backoff is exponential with jitter: a random delay in
// [base·2^(n-1)/2, base·2^(n-1)], capped at max.
func backoff(base, max time.Duration, n int) time.Duration {
	d := base
	for i := 1; i < n && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	return d/2 + rand.N(d/2+1)
}

// probe tests the upstream of a model group in outage when no job waits to
// be the probe: a free count_tokens call. Any answer (even a refusal of the
// request) means the upstream is back; only a failure of the upstream's own
// (see upstream.Error.Infra) is an error.
func (w *Worker) probe(ctx context.Context, g *config.ModelGroup, model string) error {
	body, err := json.Marshal(map[string]any{"model": model,
		"messages": []map[string]string{{"role": "user", "content": "ping"}}})
	if err != nil {
		return err
	}
	_, err = w.d.Upstream.CountTokens(ctx, body)
	var ue *upstream.Error
	if err != nil && errors.As(err, &ue) && !ue.Infra() {
		return nil
	}
	return err
}
