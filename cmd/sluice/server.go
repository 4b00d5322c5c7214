package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/hibiken/asynq"
	asynqmetrics "github.com/hibiken/asynq/x/metrics"
	"github.com/hibiken/asynqmon"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/accountlimits"
	"github.com/sluice-dev/sluice/api"
	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/estimate"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/metrics"
	"github.com/sluice-dev/sluice/redisconn"
	"github.com/sluice-dev/sluice/redisguard"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/tasks"
	"github.com/sluice-dev/sluice/upstream"
	usagestats "github.com/sluice-dev/sluice/usage"
	"github.com/sluice-dev/sluice/web"
	"github.com/sluice-dev/sluice/worker"
)

var roleText = map[string][2]string{
	"serve":  {"Runs the HTTP api and a worker in one process.", "the api's address, host:port (default :8080)"},
	"api":    {"Runs the HTTP api only. Run as many as you like against one Redis.", "the api's address, host:port (default :8080)"},
	"worker": {"Runs a worker only: it takes queued jobs and calls the upstream. Run as many as you like.", "the health endpoint's address, host:port (default :8081)"},
}

// serverUsage is `sluice serve|api|worker --help`.
func serverUsage(role string) string {
	listenEnv := [2]string{"SLUICE_LISTEN", "the api's address, as --listen"}
	if role == "worker" {
		listenEnv = [2]string{"SLUICE_WORKER_LISTEN", "the health endpoint's address, as --listen"}
	}
	return fmt.Sprintf("Usage: sluice %s [flags]\n\n%s\n\nFlags:\n", role, roleText[role][0]) + helpTable(
		[2]string{"--config PATH", "the YAML configuration file (env SLUICE_CONFIG); see sluice.example.yaml"},
		[2]string{"--listen ADDR", roleText[role][1]},
		[2]string{"--allow-evicting-redis", "start even if Redis's maxmemory-policy is not noeviction (it then deletes jobs when full: /readyz fails, a warning is logged); env SLUICE_ALLOW_EVICTING_REDIS=true, or redis.allow_evicting: true in the file"},
	) + "\nEnvironment (each beats the file):\n" + helpTable(
		[2]string{"SLUICE_CONFIG", "the configuration file, as --config"},
		listenEnv,
		[2]string{"REDIS_URL", "the Redis that holds jobs, queues and limits (redis://host:port/db; with REDIS_MODE=sentinel the sentinels: redis://s1:26379/0?addr=s2:26379&master_name=NAME)"},
		[2]string{"REDIS_MODE", "single (default), sentinel or cluster: how REDIS_URL is read (cluster: redis://node1:7000?addr=node2:7000&addr=node3:7000)"},
		[2]string{"ANTHROPIC_BASE_URL", "the upstream's base URL (default https://api.anthropic.com)"},
		[2]string{"ANTHROPIC_API_KEY", "the upstream key: only ever from the environment"},
		[2]string{"SLUICE_ADMIN_KEY", "an extra admin key (for /monitoring/)"},
		[2]string{"SLUICE_LOG_FORMAT", "text or json"},
		[2]string{"SLUICE_LOG_LEVEL", "debug, info, warn or error"},
		[2]string{"SLUICE_ALLOW_EVICTING_REDIS", "true: as --allow-evicting-redis"},
	)
}

// runServer runs `sluice serve`, `sluice api` or `sluice worker`.
func runServer(ctx context.Context, role string, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet(role, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, serverUsage(role)) }
	configPath := fs.String("config", getenv("SLUICE_CONFIG"), "")
	listen := fs.String("listen", "", "")
	allowEvicting := fs.Bool("allow-evicting-redis", false, "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := config.Load(*configPath, getenv)
	if err != nil {
		return fmt.Errorf("configuration:\n%w", err)
	}
	if *listen != "" {
		if role == "worker" {
			cfg.WorkerListen = *listen
		} else {
			cfg.Listen = *listen
		}
	}
	if *allowEvicting {
		cfg.Redis.AllowEvicting = true
	}
	return serve(ctx, cfg, roles{api: role != "worker", worker: role != "api"}, stdout, stderr, nil)
}

// roles are the parts of sluice a process runs.
type roles struct {
	api, worker bool
	// redisHint ends the message about a Redis that cannot be used at
	// start: what to change. "" means serve's: set REDIS_URL or redis_url.
	redisHint string
	// fakeUpstream: the upstream is the fake sluice started itself (dev,
	// the in-process load test): the chat page says its answers are made up.
	fakeUpstream bool
	// ownRedis: the Redis is dev's own scratch Redis (its data folder
	// given): a key layout of an earlier release is migrated in place at
	// start instead of refused, and if that cannot be done the message
	// says to delete the folder.
	ownRedis string
}

// serve runs the parts of sluice that r names until ctx ends. ready, if not
// nil, gets the bound address once the HTTP listener is up.
//
// A Redis that cannot be used stops it before anything else is printed,
// with one message that says why and what to change.
func serve(ctx context.Context, cfg *config.Config, r roles, stdout, stderr io.Writer, ready func(addr string)) error {
	// Before Redis: keys anyone can read in the repository must not open
	// an api reachable from other machines.
	if r.api {
		if err := refusePublishedKeys(cfg, cfg.Listen); err != nil {
			return err
		}
	}
	log := newLogger(cfg.Log, stderr)
	redisconn.QuietLogs(log)
	rdb, err := connectRedis(ctx, cfg, r.redisHint)
	if err != nil {
		return err
	}
	defer rdb.Close()
	if err := checkLayout(ctx, rdb, cfg.Redis.Mode); err != nil {
		if !errors.Is(err, errLegacyLayout) || r.ownRedis == "" {
			return err
		}
		fmt.Fprintf(stderr, "dev's Redis holds the key layout of an earlier release: migrating it (as sluice migrate does)\n")
		if err := (&migration{rdb: rdb, out: stderr}).run(ctx); err != nil {
			return fmt.Errorf("%w; this is dev's own Redis: delete %s to start afresh", err, r.ownRedis)
		}
	}
	// Listen before serving, so a busy port fails at once.
	ln, err := listen(cfg, r)
	if err != nil {
		return err
	}
	defer ln.Close()
	dumpConfig(stderr, cfg, r, ln)
	if r.worker && cfg.Upstream.APIKey == "" {
		log.Warn("ANTHROPIC_API_KEY is not set: upstream calls will be refused unless the upstream needs no key")
	}
	guard, err := startGuard(ctx, rdb, cfg, log)
	if err != nil {
		return err
	}
	defer guard.Stop()

	p := newParts(cfg, rdb, guard, log)
	p.fake = r.fakeUpstream
	defer p.up.Close()
	var wk *worker.Worker
	if r.worker {
		var stopWorker func()
		if wk, stopWorker, err = p.startWorker(ctx); err != nil {
			return err
		}
		defer stopWorker()
	}
	var apiSrv *api.Server
	var handler http.Handler
	if r.api {
		var closeAPI func()
		if apiSrv, closeAPI, err = p.newAPI(ctx); err != nil {
			return err
		}
		defer closeAPI()
		handler = apiSrv
	} else {
		handler = healthOnly(rdb, p.met, cfg, guard)
	}
	return serveHTTP(ctx, ln, handler, cfg, r, log, ready, apiSrv, wk)
}

// listen opens the process's HTTP listener: the api's (listen), or a
// worker's health endpoint (worker_listen).
func listen(cfg *config.Config, r roles) (net.Listener, error) {
	addr := cfg.Listen
	if !r.api {
		addr = cfg.WorkerListen
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	return ln, nil
}

// dumpConfig prints the configuration as this process uses it: the
// addresses it does not listen on say so (config.DumpFor), and a port 0
// shows the port picked.
func dumpConfig(w io.Writer, cfg *config.Config, r roles, ln net.Listener) {
	shown := *cfg
	if _, port, err := net.SplitHostPort(cfg.Listen); err == nil && port == "0" && r.api {
		shown.Listen = ln.Addr().String()
	}
	if _, port, err := net.SplitHostPort(cfg.WorkerListen); err == nil && port == "0" && !r.api {
		shown.WorkerListen = ln.Addr().String()
	}
	shown.DumpFor(w, config.Process{API: r.api, Worker: r.worker})
}

// connectRedis opens the Redis client and checks, within 5 s, that the
// Redis at redis_url answers. A Redis that does not is one error that says
// what went wrong (unreachable, refusing sluice's password, not Redis, no
// such database) and what to change, hint ("" = set REDIS_URL or
// redis_url).
func connectRedis(ctx context.Context, cfg *config.Config, hint string) (redis.UniversalClient, error) {
	rdb, err := redisconn.New(cfg.Redis.Mode, cfg.RedisURL, cfg.Redis.Timeout)
	if err != nil {
		return nil, fmt.Errorf("redis_url: %w", err)
	}
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err = rdb.Ping(pingCtx).Err()
	cancel()
	if err != nil {
		_ = rdb.Close()
		return nil, redisProblem(redactRedis(cfg.RedisURL), err, hint)
	}
	return rdb, nil
}

// redisProblem is the start-up error of the Redis at url (password
// hidden), whose PING failed with err: what went wrong, then hint, what to
// change ("" = serve's: set REDIS_URL or redis_url).
func redisProblem(url string, err error, hint string) error {
	if hint == "" {
		hint = "set REDIS_URL (or redis_url in the configuration file) to the Redis sluice should use"
	}
	msg := err.Error()
	var what string
	switch {
	case strings.Contains(msg, "NOAUTH") || strings.Contains(msg, "WRONGPASS") || strings.Contains(msg, "invalid password") || strings.Contains(msg, "invalid username-password"):
		what = "Redis at %s refused sluice's credentials (%v): give its password in the URL, redis://:PASSWORD@host:port/0 or redis://USER:PASSWORD@host:port/0"
	case strings.Contains(msg, "sentinel") || strings.Contains(msg, "master"):
		what = "cannot find the Redis primary through the sentinels at %s (%v): check the sentinels' addresses and master_name (the NAME of their \"sentinel monitor NAME\" line)"
	case strings.Contains(msg, "DB index is out of range"):
		what = "Redis at %s has no such database (%v): end the URL with a database number it has, such as /0"
	case strings.Contains(msg, "invalid reply") || strings.Contains(msg, "can't parse") || strings.Contains(msg, "tls:"):
		what = "the server at %s does not answer as Redis does (%v): check the host and port, and use rediss:// only for a Redis that speaks TLS"
	case redisconn.Unavailable(err):
		what = "cannot reach Redis at %s (%v): nothing answers there"
	default:
		what = "Redis at %s cannot be used (%v)"
	}
	return fmt.Errorf(what+"; %s", url, err, hint)
}

// startGuard checks Redis's eviction policy and starts watching it. A
// Redis that evicts keys loses accepted jobs: it is refused unless
// overridden (the guard then warns loudly, and /readyz fails). A policy
// that cannot be read (miniredis in `sluice dev`, some managed Redis) is
// only warned about.
func startGuard(ctx context.Context, rdb redis.UniversalClient, cfg *config.Config, log *slog.Logger) (*redisguard.Guard, error) {
	guard := redisguard.New(rdb, cfg.Redis, log.With("component", "redisguard"))
	if _, err := guard.Check(ctx); err != nil {
		return nil, err
	}
	guard.Start(ctx)
	return guard, nil
}

// parts are what the api and the worker of one process share.
type parts struct {
	cfg       *config.Config
	log       *slog.Logger
	rdb       redis.UniversalClient
	guard     *redisguard.Guard
	store     *jobs.Store
	sched     *scheduler.Scheduler
	estimator *estimate.Calibrator
	up        *upstream.Client
	met       *metrics.Metrics
	use       *usagestats.Recorder
	fake      bool // the upstream is sluice's own fake
}

func newParts(cfg *config.Config, rdb redis.UniversalClient, guard *redisguard.Guard, log *slog.Logger) *parts {
	p := &parts{cfg: cfg, log: log, rdb: rdb, guard: guard}
	p.store = jobs.NewStore(rdb, jobs.Options{})
	wait := redisconn.NewWaiter(cfg.Redis.WaitReplicas, cfg.Redis.WaitTimeout, log.With("component", "redis-wait"))
	p.sched = scheduler.New(rdb, p.store, scheduler.Options{LeaseTTL: cfg.Worker.LeaseTTL, MaxOutage: cfg.Upstream.MaxOutage, Wait: wait, Log: log.With("component", "scheduler")})
	p.estimator = estimate.NewCalibrator(rdb)
	p.up = upstream.New(upstream.Options{BaseURL: cfg.Upstream.BaseURL, APIKey: cfg.Upstream.APIKey, FirstByteTimeout: cfg.Upstream.FirstByteTimeout})
	p.met = metrics.New()
	p.met.Register(guard)
	if wait != nil {
		p.met.Register(wait.Collector())
	}
	p.use = usagestats.New(rdb, usagestats.Retention{Hourly: cfg.Usage.HourlyRetention, Daily: cfg.Usage.DailyRetention}, nil).WithPrices(cfg.PriceTable())
	return p
}

// startWorker starts the worker, and, with an Admin API key, the sync of
// the account's rate limits. stop ends both (the worker's Shutdown may be
// called again).
func (p *parts) startWorker(ctx context.Context) (wk *worker.Worker, stop func(), err error) {
	cfg := p.cfg
	wk = worker.New(worker.Deps{
		Config: cfg, Redis: p.rdb, Store: p.store, Scheduler: p.sched, Estimator: p.estimator,
		Upstream: p.up, Metrics: p.met, Usage: p.use, Logger: p.log.With("component", "worker"),
	})
	if err := wk.Start(); err != nil {
		return nil, nil, err
	}
	stopSync := func() {}
	if sync := accountlimits.New(accountlimits.Options{BaseURL: cfg.Upstream.BaseURL, AdminKey: cfg.Upstream.AdminKey,
		Groups: cfg.ModelGroups, Setter: p.sched, Logger: p.log.With("component", "account-limits")}); sync != nil {
		sctx, cancel := context.WithCancel(ctx)
		stopSync = cancel
		go sync.Run(sctx)
	}
	return wk, func() { stopSync(); wk.Shutdown() }, nil
}

// newAPI builds the api: its event hub, asynqmon (with admin keys), and
// the metrics only api processes report. closeAPI releases what it holds.
func (p *parts) newAPI(ctx context.Context) (srv *api.Server, closeAPI func(), err error) {
	cfg, log := p.cfg, p.log
	var closers []func()
	closeAPI = func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	hub := jobs.NewHub(p.store, log.With("component", "events"))
	closers = append(closers, func() { _ = hub.Close() })
	secret, err := jobs.TokenSecret(ctx, p.rdb)
	if err != nil {
		closeAPI()
		return nil, nil, err
	}
	mon, err := monitoring(cfg, log)
	if err != nil {
		closeAPI()
		return nil, nil, err
	}
	if mon != nil {
		closers = append(closers, func() { _ = mon.Close() })
	}
	// The fleet's shared state is reported by api processes only, so
	// summing a fleet's series counts it once per api (see README).
	p.met.Register(metrics.NewState(p.sched, cfg.ModelGroups, log.With("component", "metrics")))
	p.met.Register(asynqmetrics.NewQueueMetricsCollector(asynq.NewInspectorFromRedisClient(p.rdb)))
	deps := api.Deps{
		Config: cfg, Redis: p.rdb, Store: p.store, Hub: hub, Scheduler: p.sched, Estimator: p.estimator, Upstream: p.up, TokenSecret: secret,
		Web: web.Handler(), Dashboard: web.Dashboard(), Metrics: p.met, Usage: p.use, Guard: p.guard,
		Logger: log.With("component", "api"), FakeUpstream: p.fake,
	}
	if mon != nil {
		deps.Monitoring = mon
	}
	return api.New(deps), closeAPI, nil
}

// monitoring is asynqmon, read-only under /monitoring, when there is an
// admin key to open it; nil without one.
func monitoring(cfg *config.Config, log *slog.Logger) (*asynqmon.HTTPHandler, error) {
	if len(cfg.AdminKeys) == 0 {
		log.Info("no admin key configured: /monitoring/ is off (set admin_keys or SLUICE_ADMIN_KEY)")
		return nil, nil
	}
	connOpt, err := redisconn.AsynqOpt(cfg.Redis.Mode, cfg.RedisURL, cfg.Redis.Timeout)
	if err != nil {
		return nil, fmt.Errorf("redis_url for asynqmon: %w", err)
	}
	return asynqmon.New(asynqmon.Options{RootPath: "/monitoring", RedisConnOpt: connOpt, ReadOnly: true,
		PayloadFormatter: asynqmon.PayloadFormatterFunc(tasks.FormatPayload),
		ResultFormatter:  asynqmon.ResultFormatterFunc(tasks.FormatResult)}), nil
}

// serveHTTP serves handler on ln until ctx ends or the server fails, then
// shuts down: the api's event streams end (apiSrv, if not nil), the server
// gets api.shutdown_timeout to finish its requests, then the worker (wk, if
// not nil) shuts down.
func serveHTTP(ctx context.Context, ln net.Listener, handler http.Handler, cfg *config.Config, r roles, log *slog.Logger,
	ready func(addr string), apiSrv *api.Server, wk *worker.Worker) error {
	// No ReadTimeout or WriteTimeout: they would cut event streams. The
	// api bounds a request's body itself (api.body_timeout).
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: cfg.API.ReadHeaderTimeout, IdleTimeout: cfg.API.IdleTimeout}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	what := map[bool]string{true: "api", false: "worker health"}[r.api]
	log.Info("listening", "what", what, "addr", "http://"+ln.Addr().String())
	if ready != nil {
		ready(ln.Addr().String())
	}

	select {
	case <-ctx.Done():
	case err := <-errc:
		if !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("http server: %w", err)
		}
	}
	log.Info("shutting down")
	if apiSrv != nil {
		apiSrv.CloseStreams()
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.API.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("http shutdown did not finish in time", "err", err)
	}
	if wk != nil {
		wk.Shutdown()
	}
	log.Info("stopped")
	return nil
}

// healthOnly serves /healthz, /readyz and /metrics (its upstream calls,
// tokens and dispatches) for a worker process. /readyz fails while Redis is
// away, or evicts keys (guard; nil = not checked).
func healthOnly(rdb redis.UniversalClient, met *metrics.Metrics, cfg *config.Config, guard *redisguard.Guard) http.Handler {
	mux := http.NewServeMux()
	mh := met.Handler()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		if cfg.Metrics.RequireAdminKey && !cfg.IsAdminKey(api.AdminKeyOf(r)) {
			w.Header().Set("WWW-Authenticate", `Basic realm="sluice admin", charset="UTF-8"`)
			http.Error(w, "/metrics needs the sluice admin key (metrics.require_admin_key is on).", http.StatusUnauthorized)
			return
		}
		mh.ServeHTTP(w, r)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"status":"ok"}`)
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		timeout := cfg.Redis.Timeout
		if timeout <= 0 {
			timeout = config.DefaultRedisTimeout
		}
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		if err := rdb.Ping(ctx).Err(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = io.WriteString(w, `{"status":"unavailable","redis":"unreachable"}`)
			return
		}
		if guard != nil {
			if st := guard.Status(); st.Evicting() {
				w.WriteHeader(http.StatusServiceUnavailable)
				_ = json.NewEncoder(w).Encode(map[string]string{"status": "unavailable", "redis": "evicting",
					"maxmemory_policy": st.Policy, "message": st.Problem()})
				return
			}
		}
		_, _ = io.WriteString(w, `{"status":"ready","redis":"ok"}`)
	})
	return mux
}

// newLogger is a process's logger. Times, the record's own and any time
// value logged, are written with exactly three fractional digits
// (2026-11-29T20:24:03.590Z), as the api's created_at, whatever the format:
// slog's JSON handler alone would drop trailing zeros.
func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: millisTimes}
	if strings.EqualFold(c.Format, "json") {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// timeLayout is how sluice writes a time for people and logs: RFC 3339
// with milliseconds, always three digits.
const timeLayout = "2006-01-02T15:04:05.000Z07:00"

// millisTimes is a slog ReplaceAttr that writes time values as timeLayout.
func millisTimes(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindTime {
		a.Value = slog.StringValue(a.Value.Time().Format(timeLayout))
	}
	return a
}

// redactRedis hides a password in a Redis URL: its user part, and a
// Sentinel URL's password parameter (the primary's password).
func redactRedis(u string) string {
	if i := strings.Index(u, "password="); i > 0 {
		end := strings.IndexByte(u[i:], '&')
		if end < 0 {
			end = len(u) - i
		}
		u = u[:i] + "password=***" + u[i+end:]
	}
	if i := strings.Index(u, "@"); i > 0 {
		if j := strings.Index(u, "://"); j > 0 && j < i {
			return u[:j+3] + "***@" + u[i+1:]
		}
	}
	return u
}
