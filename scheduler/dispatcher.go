package scheduler

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/redisconn"
	"github.com/sluice-dev/sluice/tasks"
)

// Enqueuer hands a task to asynq (asynq.Client).
type Enqueuer interface {
	EnqueueContext(ctx context.Context, task *asynq.Task, opts ...asynq.Option) (*asynq.TaskInfo, error)
}

// DispatcherDeps are what a Dispatcher needs.
type DispatcherDeps struct {
	Scheduler *Scheduler
	Redis     redis.UniversalClient
	Groups    []config.ModelGroup
	Enqueuer  Enqueuer
	Task      tasks.RunJobOptions
	Logger    *slog.Logger
	// Expire ends a job whose deadline passed while it was queued (the
	// dispatch script has taken it out of the queue).
	Expire func(ctx context.Context, g *config.ModelGroup, jobID string) error
	// Probe, if set, tests the upstream for a group in outage when no job
	// waits to be the probe (see State Probe): nil when the upstream
	// answered (whatever it said), an error when it did not.
	Probe func(ctx context.Context, g *config.ModelGroup, model string) error
	// OnDispatched, if set, is told how many jobs each dispatch picked (metrics).
	OnDispatched func(group string, n int)
	// HandOverAfter is how old a picked-but-not-handed job must be before
	// another dispatcher hands it over. Default 5s.
	HandOverAfter time.Duration
}

// Dispatcher moves jobs from the fair queues to asynq, one loop per model
// group. Every worker process runs one.
//
// Why every process and no leader: the decision (pick the next job if the
// limiter has room, reserve, lease) is one atomic Lua script, so two
// dispatchers can never pick the same job, and nothing needs electing,
// fencing or failing over. A dispatcher that dies loses nothing: a job it
// picked but did not hand to asynq stays in the group's dispatching set and
// another dispatcher hands it over (asynq's TaskID makes that exactly once).
//
// A loop sleeps until something can change its answer: a Pub/Sub wake (a job
// arrived, a call finished, a retry was queued) or the time the script said
// the next job fits, a retry falls due, or a lease ends. A long safety
// timer only covers a lost Pub/Sub message.
type Dispatcher struct {
	d     DispatcherDeps
	batch int
}

const (
	// dispatchBatch is how many jobs one script call may pick.
	dispatchBatch = 32
	// safetyWake bounds a sleep in case a wake message was lost.
	safetyWake = 5 * time.Second
	// defaultHandOver is DispatcherDeps.HandOverAfter's default.
	defaultHandOver = 5 * time.Second
)

// NewDispatcher returns a Dispatcher; Run runs it.
func NewDispatcher(d DispatcherDeps) *Dispatcher {
	if d.HandOverAfter <= 0 {
		d.HandOverAfter = defaultHandOver
	}
	return &Dispatcher{d: d, batch: dispatchBatch}
}

// Run dispatches until ctx ends.
func (d *Dispatcher) Run(ctx context.Context) error {
	wakes := map[string]chan struct{}{}
	channels := make([]string, 0, len(d.d.Groups))
	for _, g := range d.d.Groups {
		wakes[wakeChannel(g.Name)] = make(chan struct{}, 1)
		channels = append(channels, wakeChannel(g.Name))
	}
	ps := d.d.Redis.Subscribe(ctx, channels...)
	defer ps.Close()
	// Wait for the subscription before the first round, so no wake is missed.
	if _, err := ps.Receive(ctx); err != nil && ctx.Err() == nil {
		d.d.Logger.Warn("dispatcher: wake subscription not confirmed; relying on timers", "err", err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		ch := ps.Channel(redis.WithChannelHealthCheckInterval(10 * time.Second))
		for {
			select {
			case <-ctx.Done():
				return
			case m, ok := <-ch:
				if !ok {
					return
				}
				signal(wakes[m.Channel])
			}
		}
	}()
	for i := range d.d.Groups {
		g := &d.d.Groups[i]
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.loop(ctx, g, wakes[wakeChannel(g.Name)])
		}()
	}
	wg.Wait()
	return nil
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (d *Dispatcher) loop(ctx context.Context, g *config.ModelGroup, wake chan struct{}) {
	log := d.d.Logger.With("group", g.Name)
	failing := redisconn.NewReporter(log, "dispatch")
	timer := time.NewTimer(0)
	defer timer.Stop()
	lastHandOver := time.Time{}
	down := false
	for {
		sleep, expiring, state := d.round(ctx, log, failing, g)
		if state != "" && (state == Down) != down {
			down = state == Down
			if down {
				log.Warn("the model group is in outage: dispatching only probes until the upstream answers again")
			} else {
				log.Info("the model group's outage is over: dispatching again")
			}
		}
		if expiring {
			d.expire(ctx, log, g)
		}
		if time.Since(lastHandOver) > d.d.HandOverAfter {
			d.handOver(ctx, log, g)
			lastHandOver = time.Now()
		}
		sleep = min(sleep, d.d.HandOverAfter)
		if sleep == 0 {
			if ctx.Err() != nil {
				return
			}
			continue
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(sleep)
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-timer.C:
		}
	}
}

// round runs one dispatch round and says how long to sleep after it,
// whether jobs past their deadline wait to be expired, and why the round
// stopped ("" when it failed).
func (d *Dispatcher) round(ctx context.Context, log *slog.Logger, failing *redisconn.Reporter, g *config.ModelGroup) (time.Duration, bool, State) {
	res, err := d.d.Scheduler.Dispatch(ctx, g, d.batch)
	if err != nil {
		if ctx.Err() == nil {
			failing.Fail(err)
		}
		return 500 * time.Millisecond, false, ""
	}
	failing.OK()
	if d.d.OnDispatched != nil && len(res.Jobs) > 0 {
		d.d.OnDispatched(g.Name, len(res.Jobs))
	}
	for _, p := range res.Jobs {
		d.enqueue(ctx, log, g.Name, p)
	}
	expiring := res.Expiring > 0
	switch res.State {
	case More:
		return 0, expiring, res.State
	case Probe:
		go d.probe(ctx, log, g, res.ProbeModel)
		return min(res.Wait, safetyWake), expiring, Down
	case Wait, Full, Down, Hold:
		return min(max(res.Wait, time.Millisecond), safetyWake), expiring, res.State
	default: // Empty
		if res.Wait > 0 {
			return min(res.Wait, safetyWake), expiring, res.State
		}
		return safetyWake, expiring, res.State
	}
}

// probe tests the upstream of a group in outage without a job and reports
// the outcome: an answer ends the outage (dispatch resumes), a failure sets
// the next probe later. With no way to probe (no Probe, no model known)
// the probe's claim lapses after a lease and the next round tries again.
func (d *Dispatcher) probe(ctx context.Context, log *slog.Logger, g *config.ModelGroup, model string) {
	if d.d.Probe == nil || model == "" {
		log.Debug("no jobless probe possible: waiting for a job to probe with", "model", model)
		return
	}
	pctx, cancel := context.WithTimeout(ctx, time.Minute)
	err := d.d.Probe(pctx, g, model)
	cancel()
	if ctx.Err() != nil {
		return
	}
	bg := context.WithoutCancel(ctx)
	if err != nil {
		log.Info("probe: the upstream is still failing", "err", err)
		if rerr := d.d.Scheduler.ProbeFailed(bg, g); rerr != nil {
			log.Warn("could not record a failed probe", "err", rerr)
		}
		return
	}
	if _, rerr := d.d.Scheduler.Observe(bg, g, nil, true); rerr != nil {
		log.Warn("could not record a probe's answer", "err", rerr)
	}
}

// enqueue hands one dispatch to asynq. A TaskID conflict means it was
// already handed over: fine.
func (d *Dispatcher) enqueue(ctx context.Context, log *slog.Logger, group string, p Picked) {
	task, err := tasks.NewRunJob(tasks.RunJob{JobID: p.JobID, Group: group, Dispatch: p.Dispatch}, d.d.Task)
	if err == nil {
		_, err = d.d.Enqueuer.EnqueueContext(context.WithoutCancel(ctx), task)
	}
	if err != nil && !errors.Is(err, asynq.ErrTaskIDConflict) {
		// Left in the dispatching set: handOver retries it.
		log.Error("could not hand a job to asynq; will retry", d.about(ctx, p.JobID, "dispatch", p.Dispatch, "err", err)...)
		return
	}
	if err := d.d.Scheduler.Handed(context.WithoutCancel(ctx), group, p); err != nil {
		log.Warn("could not mark job handed over", d.about(ctx, p.JobID, "err", err)...)
	}
}

// about is the attributes of a log line about a job: its id, tenant and
// user (read from its record: the queues hold only ids), then more.
func (d *Dispatcher) about(ctx context.Context, id string, more ...any) []any {
	tenant, user := d.d.Scheduler.store.Owner(context.WithoutCancel(ctx), id)
	return append([]any{"job_id", id, "tenant", tenant, "user_id", user}, more...)
}

// handOver finishes the dispatches of a dispatcher that died between
// picking a job and handing it to asynq.
func (d *Dispatcher) handOver(ctx context.Context, log *slog.Logger, g *config.ModelGroup) {
	stale, err := d.d.Scheduler.Unhanded(ctx, g.Name, d.d.HandOverAfter)
	if err != nil {
		if ctx.Err() == nil {
			log.Warn("could not list unhanded dispatches", "err", err)
		}
		return
	}
	for _, p := range stale {
		log.Info("handing over a dispatch left by another dispatcher", d.about(ctx, p.JobID, "dispatch", p.Dispatch)...)
		d.enqueue(ctx, log, g.Name, p)
	}
}

// expire ends the jobs the dispatch script found past their deadline.
func (d *Dispatcher) expire(ctx context.Context, log *slog.Logger, g *config.ModelGroup) {
	ids, err := d.d.Scheduler.Expiring(ctx, g.Name)
	if err != nil || len(ids) == 0 || d.d.Expire == nil {
		return
	}
	for _, id := range ids {
		if err := d.d.Expire(ctx, g, id); err != nil {
			log.Warn("could not expire a job past its deadline; will retry", d.about(ctx, id, "err", err)...)
			continue
		}
		if err := d.d.Scheduler.Expired(ctx, g.Name, id); err != nil {
			log.Warn("could not forget an expired job", d.about(ctx, id, "err", err)...)
		}
	}
}
