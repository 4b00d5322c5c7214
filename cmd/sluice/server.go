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

const serverHelp = `Usage: sluice %[1]s [flags]

%[2]s

Flags:
  --config PATH   the YAML configuration file (env SLUICE_CONFIG); see sluice.example.yaml
  --listen ADDR   %[3]s
  --allow-evicting-redis
                  start even if Redis's maxmemory-policy is not noeviction
                  (it then deletes jobs when full: /readyz fails, a warning
                  is logged); env SLUICE_ALLOW_EVICTING_REDIS=true, or
                  redis.allow_evicting: true in the file

Environment (each beats the file):
  SLUICE_CONFIG         the configuration file, as --config
  %[4]s
  REDIS_URL             the Redis that holds jobs, queues and limits (redis://host:port/db)
  ANTHROPIC_BASE_URL    the upstream's base URL (default https://api.anthropic.com)
  ANTHROPIC_API_KEY     the upstream key: only ever from the environment
  SLUICE_ADMIN_KEY      an extra admin key (for /monitoring/)
  SLUICE_LOG_FORMAT     text or json
  SLUICE_LOG_LEVEL      debug, info, warn or error
  SLUICE_ALLOW_EVICTING_REDIS  true: as --allow-evicting-redis
`

var roleText = map[string][2]string{
	"serve":  {"Runs the HTTP api and a worker in one process.", "the api's address, host:port (default :8080)"},
	"api":    {"Runs the HTTP api only. Run as many as you like against one Redis.", "the api's address, host:port (default :8080)"},
	"worker": {"Runs a worker only: it takes queued jobs and calls the upstream. Run as many as you like.", "the health endpoint's address, host:port (default :8081)"},
}

// runServer runs `sluice serve`, `sluice api` or `sluice worker`.
func runServer(ctx context.Context, role string, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet(role, flag.ContinueOnError)
	fs.SetOutput(stderr)
	listenEnv := "SLUICE_LISTEN          the api's address, as --listen"
	if role == "worker" {
		listenEnv = "SLUICE_WORKER_LISTEN  the health endpoint's address, as --listen"
	}
	fs.Usage = func() {
		fmt.Fprintf(stderr, serverHelp, role, roleText[role][0], roleText[role][1], listenEnv)
	}
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

type roles struct{ api, worker bool }

// serve runs the parts of sluice that r names until ctx ends. ready, if not
// nil, gets the bound address once the HTTP listener is up.
func serve(ctx context.Context, cfg *config.Config, r roles, stdout, stderr io.Writer, ready func(addr string)) error {
	// Before Redis: keys anyone can read in the repository must not open
	// an api reachable from other machines.
	if r.api {
		if err := refusePublishedKeys(cfg, cfg.Listen); err != nil {
			return err
		}
	}
	log := newLogger(cfg.Log, stderr)
	cfg.Dump(stderr)
	if r.worker && cfg.Upstream.APIKey == "" {
		log.Warn("ANTHROPIC_API_KEY is not set: upstream calls will be refused unless the upstream needs no key")
	}

	redisconn.QuietLogs(log)
	rdb, err := redisconn.New(cfg.RedisURL, cfg.Redis.Timeout)
	if err != nil {
		return fmt.Errorf("redis_url: %w", err)
	}
	defer rdb.Close()
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err = rdb.Ping(pingCtx).Err()
	cancel()
	if err != nil {
		return fmt.Errorf("cannot reach Redis at %s: %w (is it running? set REDIS_URL or redis_url)", redactRedis(cfg.RedisURL), err)
	}
	// A Redis that evicts keys loses accepted jobs: refuse it unless
	// overridden (the guard then warns loudly, and /readyz fails). A policy
	// that cannot be read (miniredis in `sluice dev`, some managed Redis) is
	// only warned about.
	guard := redisguard.New(rdb, cfg.Redis, log.With("component", "redisguard"))
	if _, err := guard.Check(ctx); err != nil {
		return err
	}
	guard.Start(ctx)
	defer guard.Stop()

	addr := cfg.Listen
	if !r.api {
		addr = cfg.WorkerListen
	}
	// Listen before serving, so a busy port fails at once.
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	defer ln.Close()

	store := jobs.NewStore(rdb, jobs.Options{})
	sched := scheduler.New(rdb, store, scheduler.Options{LeaseTTL: cfg.Worker.LeaseTTL, MaxOutage: cfg.Upstream.MaxOutage})
	estimator := estimate.NewCalibrator(rdb)
	up := upstream.New(upstream.Options{BaseURL: cfg.Upstream.BaseURL, APIKey: cfg.Upstream.APIKey, FirstByteTimeout: cfg.Upstream.FirstByteTimeout})
	defer up.Close()
	met := metrics.New()
	met.Register(guard)
	use := usagestats.New(rdb, usagestats.Retention{Hourly: cfg.Usage.HourlyRetention, Daily: cfg.Usage.DailyRetention}, nil)
	var wk *worker.Worker
	if r.worker {
		wk = worker.New(worker.Deps{
			Config: cfg, Redis: rdb, Store: store, Scheduler: sched, Estimator: estimator,
			Upstream: up, Metrics: met, Usage: use, Logger: log.With("component", "worker"),
		})
		if err := wk.Start(); err != nil {
			return err
		}
		defer wk.Shutdown()
		// The account's rate limits, with an Admin API key.
		if sync := accountlimits.New(accountlimits.Options{BaseURL: cfg.Upstream.BaseURL, AdminKey: cfg.Upstream.AdminKey,
			Groups: cfg.ModelGroups, Setter: sched, Logger: log.With("component", "account-limits")}); sync != nil {
			sctx, stopSync := context.WithCancel(ctx)
			defer stopSync()
			go sync.Run(sctx)
		}
	}

	var handler http.Handler
	var apiSrv *api.Server
	if r.api {
		hub := jobs.NewHub(store, log.With("component", "events"))
		defer hub.Close()
		secret, err := jobs.TokenSecret(ctx, rdb)
		if err != nil {
			return err
		}
		var mon http.Handler
		if len(cfg.AdminKeys) > 0 {
			connOpt, err := asynq.ParseRedisURI(cfg.RedisURL)
			if err != nil {
				return fmt.Errorf("redis_url for asynqmon: %w", err)
			}
			m := asynqmon.New(asynqmon.Options{RootPath: "/monitoring", RedisConnOpt: connOpt, ReadOnly: true,
				PayloadFormatter: asynqmon.PayloadFormatterFunc(tasks.FormatPayload),
				ResultFormatter:  asynqmon.ResultFormatterFunc(tasks.FormatResult)})
			defer m.Close()
			mon = m
		} else {
			log.Info("no admin key configured: /monitoring/ is off (set admin_keys or SLUICE_ADMIN_KEY)")
		}
		// The fleet's shared state is reported by api processes only, so
		// summing a fleet's series counts it once per api (see README).
		met.Register(metrics.NewState(sched, cfg.ModelGroups, log.With("component", "metrics")))
		inspector := asynq.NewInspectorFromRedisClient(rdb)
		met.Register(asynqmetrics.NewQueueMetricsCollector(inspector))
		apiSrv = api.New(api.Deps{
			Config: cfg, Redis: rdb, Store: store, Hub: hub, Scheduler: sched, Estimator: estimator, Upstream: up, TokenSecret: secret,
			Monitoring: mon, Web: web.Handler(), Dashboard: web.Dashboard(), Metrics: met, Usage: use, Guard: guard,
			Logger: log.With("component", "api"),
		})
		handler = apiSrv
	} else {
		handler = healthOnly(rdb, met, cfg, guard)
	}

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

func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if strings.EqualFold(c.Format, "json") {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// redactRedis hides a password in a Redis URL.
func redactRedis(u string) string {
	if i := strings.Index(u, "@"); i > 0 {
		if j := strings.Index(u, "://"); j > 0 && j < i {
			return u[:j+3] + "***@" + u[i+1:]
		}
	}
	return u
}
