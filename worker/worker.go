// Package worker runs jobs: the asynq handler that makes one upstream call
// for a dispatched job, with the scheduler's reservation and concurrency
// lease in hand; it streams the text into the job's event log, stores the
// result, settles the reservation with the real usage, and decides what a
// failure means (wait, retry later, or give up). Retry policy lives here.
package worker

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/estimate"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/metrics"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/tasks"
	"github.com/sluice-dev/sluice/upstream"
	"github.com/sluice-dev/sluice/usage"
)

// Deps are what a Worker needs.
type Deps struct {
	Config    *config.Config
	Redis     redis.UniversalClient
	Store     *jobs.Store
	Scheduler *scheduler.Scheduler
	Estimator *estimate.Calibrator
	Upstream  *upstream.Client
	Metrics   *metrics.Metrics // nil = none
	Usage     *usage.Recorder  // nil = no usage statistics
	Logger    *slog.Logger
	Clock     func() time.Time // nil = time.Now
}

// Worker is an asynq server with one queue per model group.
type Worker struct {
	d        Deps
	srv      *asynq.Server
	aq       *asynq.Client
	disp     *scheduler.Dispatcher
	dispWG   sync.WaitGroup
	dispStop context.CancelFunc
	// base is the handlers' context: canceled late in a shutdown, so that
	// calls still running stop and hand their jobs back. hard ends just
	// before the shutdown timeout: an answer that arrived but could not yet
	// be written (Redis away) goes to the spool then.
	base     context.Context
	cancel   context.CancelFunc
	hard     context.Context
	stopHard context.CancelFunc
	groups   map[string]*config.ModelGroup
	tenants  map[string]*config.Tenant

	// running maps a job id to the cancel func of its call in this process,
	// so a cancel published by an api process stops it at once.
	running sync.Map

	stopOnce sync.Once
}

// New builds a Worker; Start runs it.
func New(d Deps) *Worker {
	if d.Clock == nil {
		d.Clock = time.Now
	}
	cfg := d.Config
	w := &Worker{d: d, groups: map[string]*config.ModelGroup{}, tenants: map[string]*config.Tenant{}}
	for i := range cfg.Tenants {
		w.tenants[cfg.Tenants[i].Name] = &cfg.Tenants[i]
	}
	w.base, w.cancel = context.WithCancel(context.Background())
	w.hard, w.stopHard = context.WithCancel(context.Background())
	queues := map[string]int{}
	concurrency := 0
	for i := range cfg.ModelGroups {
		g := &cfg.ModelGroups[i]
		w.groups[g.Name] = g
		queues[tasks.Queue(g.Name)] = 1
		// The fleet-wide cap is the scheduler's leases; a process can run
		// every lease of every group, so a dispatched job never waits for a
		// worker slot.
		concurrency += g.MaxConcurrency
	}
	w.srv = asynq.NewServerFromRedisClient(d.Redis, asynq.Config{
		Concurrency:       concurrency,
		Queues:            queues,
		BaseContext:       func() context.Context { return w.base },
		TaskCheckInterval: cfg.Worker.TaskCheckInterval,
		ShutdownTimeout:   cfg.Worker.ShutdownTimeout,
		Logger:            newAsynqLogger(d.Logger.With("component", "asynq")),
		LogLevel:          asynq.WarnLevel,
		ErrorHandler: asynq.ErrorHandlerFunc(func(ctx context.Context, t *asynq.Task, err error) {
			id, _ := asynq.GetTaskID(ctx)
			d.Logger.Warn("task failed inside sluice; asynq retries it", "task_id", id, "err", err)
		}),
	})
	w.aq = asynq.NewClientFromRedisClient(d.Redis)
	w.disp = scheduler.NewDispatcher(scheduler.DispatcherDeps{
		Scheduler: d.Scheduler, Redis: d.Redis, Groups: cfg.ModelGroups, Enqueuer: w.aq,
		Task: tasks.RunJobOptions{
			MaxRetry:  3,
			Timeout:   cfg.Upstream.AttemptTimeout + time.Minute, // the worker's own attempt timeout fires first
			Retention: time.Hour,                                 // finished tasks stay visible in asynqmon
		},
		Logger:       d.Logger.With("component", "dispatcher"),
		Expire:       w.expireQueued,
		OnDispatched: d.Metrics.Dispatched,
		Probe:        w.probe,
	})
	return w
}

// policy is the quota policy of a job's user.
func (w *Worker) policy(j *jobs.Job) config.UserPolicy {
	if t, ok := w.tenants[j.Tenant]; ok {
		return t.Policy(j.UserID)
	}
	return config.UserPolicy{}
}

// Handler is the worker's task mux: every task type it runs.
func (w *Worker) Handler() asynq.Handler {
	mux := asynq.NewServeMux()
	mux.HandleFunc(tasks.TypeRunJob, w.RunJob)
	return mux
}

// Start begins processing and dispatching; it returns at once.
func (w *Worker) Start() error {
	if err := w.srv.Start(w.Handler()); err != nil {
		return fmt.Errorf("worker: start: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	w.dispStop = cancel
	w.dispWG.Add(3)
	go func() {
		defer w.dispWG.Done()
		_ = w.disp.Run(ctx)
	}()
	go func() {
		defer w.dispWG.Done()
		w.runBatches(ctx)
	}()
	go func() {
		defer w.dispWG.Done()
		w.listenCancels(ctx)
	}()
	return nil
}

// listenCancels stops this process's call of a job canceled elsewhere.
func (w *Worker) listenCancels(ctx context.Context) {
	ps := w.d.Redis.Subscribe(ctx, scheduler.CancelChannel)
	defer ps.Close()
	ch := ps.Channel(redis.WithChannelHealthCheckInterval(10 * time.Second))
	for {
		select {
		case <-ctx.Done():
			return
		case m, ok := <-ch:
			if !ok {
				return
			}
			if c, ok := w.running.Load(m.Payload); ok {
				c.(context.CancelFunc)()
			}
		}
	}
}

// Shutdown stops taking tasks and lets running calls finish within the
// configured shutdown timeout. At 80% of it, calls still running are
// stopped and their jobs handed back to the fair queue (first in line), to
// run again elsewhere as a new attempt; at 95%, an answer that arrived but
// could not be written yet (Redis unreachable) is written to the spool.
func (w *Worker) Shutdown() {
	w.stopOnce.Do(func() {
		if w.dispStop != nil {
			w.dispStop() // dispatch no more: other processes' dispatchers take over
			w.dispWG.Wait()
		}
		grace := w.d.Config.Worker.ShutdownTimeout
		t1 := time.AfterFunc(grace*8/10, w.cancel)
		defer t1.Stop()
		t2 := time.AfterFunc(grace*95/100, w.stopHard)
		defer t2.Stop()
		w.srv.Shutdown()
		w.cancel()
		w.stopHard()
		_ = w.aq.Close()
	})
}

// asynqLogger routes asynq's logs to slog. asynq polls Redis every few
// milliseconds and logs each failed poll: a warning or error already logged
// within asynqRepeatEvery (compared by its first words) goes to debug.
type asynqLogger struct {
	l    *slog.Logger
	mu   sync.Mutex
	seen map[string]time.Time
}

func newAsynqLogger(l *slog.Logger) *asynqLogger {
	return &asynqLogger{l: l, seen: map[string]time.Time{}}
}

const asynqRepeatEvery = 30 * time.Second

func (a *asynqLogger) Debug(args ...any) { a.l.Debug(fmt.Sprint(args...)) }
func (a *asynqLogger) Info(args ...any)  { a.l.Info(fmt.Sprint(args...)) }
func (a *asynqLogger) Warn(args ...any)  { a.log(slog.LevelWarn, fmt.Sprint(args...)) }
func (a *asynqLogger) Error(args ...any) { a.log(slog.LevelError, fmt.Sprint(args...)) }
func (a *asynqLogger) Fatal(args ...any) { a.log(slog.LevelError, fmt.Sprint(args...)) }

func (a *asynqLogger) log(level slog.Level, msg string) {
	kind := msg
	if i := strings.IndexByte(kind, ':'); i > 0 {
		kind = kind[:i]
	}
	now := time.Now()
	a.mu.Lock()
	if at, ok := a.seen[kind]; ok && now.Sub(at) < asynqRepeatEvery {
		level = slog.LevelDebug
	} else {
		a.seen[kind] = now
	}
	a.mu.Unlock()
	a.l.Log(context.Background(), level, msg)
}
