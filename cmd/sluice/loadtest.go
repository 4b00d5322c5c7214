package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/loadtest"
)

const loadtestHelp = `Usage: sluice loadtest --scenario NAME [flags]

Drives a sluice through a named scenario and reports what sluice
promises: utilization of each limit (and which one binds), upstream 429s,
Jain's fairness index over backlogged users, waits per user class, how true
the position told at submit came, and how many dispatches a newcomer waited.

Without --url it starts everything in this process: a Redis (REDIS_URL, else a
redis-server from PATH on a free port in a temporary folder, else an embedded
one), a fake Anthropic API with the limits below, and sluice (api + worker)
with the same limits and a tenant without queue caps or wait limits (so a
scenario's backlog is really queued). With --url it measures that sluice,
and the fake behind it when --fake-url is given; the tenant's own caps then
apply, and the report's jobs line counts the refusals by the cap that refused.

Scenarios:
  classroom       --users students (30) send --requests-per-user requests (5)
                  each at random moments within --spread (10s)
  heavy-vs-light  one user submits --heavy-jobs jobs (500), then --users light
                  users (20) arrive one at a time with one job each (the next
                  when the previous has started, or every --light-interval);
                  stops once the light jobs are done
  classes         heavy-vs-light with service classes: --background-users
                  users (4) share a backlog of --heavy-jobs background jobs
                  (500), then --users interactive users (20) arrive one at a
                  time; reports the background share of the dispatches
  saturate        --users users (20) keep a backlog queued for --warmup (60s)
                  + --duration (2m); figures cover the --duration
  long-answers    saturate with the output limit binding: answers of 1,000
                  tokens at 50 tokens/s, max_tokens 8,192, 10 users; unless
                  given: --rpm 1000 --input-tpm 1000000 --output-tpm 8000
                  --max-concurrency 16
  cached-classroom
                  saturate where every job carries one shared system prompt
                  of --prefix-bytes (6,000 tokens) marked for prompt caching
                  and a short question, 30 users; unless given: --rpm 120
                  --input-tpm 60000 --output-tpm 100000 --max-concurrency 16
  mixed-cache     saturate where half of 20 users send that cached prompt and
                  half a new uncached one of the same size each time; unless
                  given: --rpm 1000 --input-tpm 60000 --output-tpm 1000000
                  --max-concurrency 16
  batch           the same jobs twice, --users users (5) × --requests-per-user
                  jobs (20), max_tokens 1,024, replies of 200 tokens: first as
                  interactive jobs (Messages API), then as background jobs
                  with deadline_seconds 7200, which a model group with
                  batch: true sends through the Message Batches API; reports
                  how each pass went upstream, the batches and Messages calls
                  the upstream saw, each pass's cost and wall time, and the
                  cost ratio batch / interactive (~0.50). In-process the group
                  has batch on (batch_window 2s, batch_poll 500ms); unless
                  given: --rpm 1000 --input-tpm 1000000 --output-tpm 1000000
                  --max-concurrency 16

Flags:
  --scenario NAME         classroom, heavy-vs-light, classes, saturate,
                          long-answers, cached-classroom, mixed-cache or batch
                          (required)
  --url URL               a running sluice's base URL; none = start one in-process
  --key KEY               its tenant key (env SLUICE_KEY); in-process makes one
  --fake-url URL          the fake upstream behind --url, for 429s and upstream
                          utilization; without it they are unknown / from the jobs
  --fake-group NAME       the fake's model group to read (default: all summed)
  --model NAME            the model of every job (default claude-sonnet-4-6)
  --users N               students, light users or users (defaults 30, 20, 20;
                          batch 5)
  --requests-per-user N   classroom: requests per student (default 5); batch:
                          jobs per user and pass (default 20)
  --spread D              classroom: arrivals spread over D (default 10s)
  --heavy-jobs N          heavy-vs-light: the heavy user's jobs; classes: the
                          background jobs (default 500)
  --background-users N    classes: users sharing the background jobs (default 4)
  --light-interval D      heavy-vs-light, classes: a newcomer every D; 0 = each
                          once the previous one started (default 0)
  --duration D            saturate: the measured time (default 2m)
  --warmup D              time work must have been waiting before utilization
                          is measured, because the upstream's buckets start
                          full (default 60s; 0 = none)
  --rpm N                 requests per minute          } in-process: the limits of
  --input-tpm N           input tokens per minute      } sluice and the fake; with
  --output-tpm N          output tokens per minute     } --url: what utilization is
  --max-concurrency N     upstream calls in flight     } measured against
                          (defaults: tier 1, 50 / 30000 / 8000 / 8)
  --reply-tokens N        reply length asked of the fake (default 100)
  --max-tokens N          max_tokens of each job (default --reply-tokens)
  --prompt-bytes N        prompt length in bytes (default 400: 112 input tokens)
  --prefix-bytes N        cache scenarios: the system prompt's length in bytes
                          (default 24000: 6,000 input tokens)
  --timeout D             longest wait for jobs to finish after submitting
                          (default 10m); unfinished jobs then count as lost
  --seed N                seed of arrival times and prompts (default 1)
  --json                  print one JSON object instead of the table

In-process only:
  --tokens-per-second N   the fake's output pace (default 60; 0 = instant)
  --latency D             the fake's wait before answering (default 300ms)
  --batch-delay D         batch: how long the fake takes to process a Message
                          Batch (default 3s)
  --workers N             extra worker-only roles on the same Redis (default 0)
  --log PATH              write sluice's logs there (default: discarded)
  -v                      write sluice's logs to stderr

Environment:
  SLUICE_KEY   the tenant key, as --key
  REDIS_URL    in-process: use this Redis (best empty: queued jobs left in it
               would run too) instead of starting one

Progress goes to stderr, the report to stdout.
`

// runLoadtest runs `sluice loadtest`.
func runLoadtest(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("loadtest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, loadtestHelp) }
	tier := fakeanthropic.TierOne()[0]
	var o loadtest.Options
	fs.StringVar(&o.Scenario, "scenario", "", "")
	fs.StringVar(&o.BaseURL, "url", "", "")
	fs.StringVar(&o.Key, "key", getenv("SLUICE_KEY"), "")
	fs.StringVar(&o.FakeURL, "fake-url", "", "")
	fs.StringVar(&o.FakeGroup, "fake-group", "", "")
	fs.StringVar(&o.Model, "model", loadtest.DefaultModel, "")
	fs.IntVar(&o.Users, "users", 0, "")
	fs.IntVar(&o.RequestsPerUser, "requests-per-user", loadtest.DefaultRequestsPerUser, "")
	fs.DurationVar(&o.Spread, "spread", loadtest.DefaultSpread, "")
	fs.IntVar(&o.HeavyJobs, "heavy-jobs", loadtest.DefaultHeavyJobs, "")
	fs.IntVar(&o.BackgroundUsers, "background-users", loadtest.DefaultBackgroundUsers, "")
	fs.DurationVar(&o.LightInterval, "light-interval", 0, "")
	fs.DurationVar(&o.Duration, "duration", loadtest.DefaultDuration, "")
	fs.DurationVar(&o.Warmup, "warmup", loadtest.DefaultWarmup, "")
	fs.IntVar(&o.Limits.RPM, "rpm", tier.RPM, "")
	fs.IntVar(&o.Limits.InputTPM, "input-tpm", tier.InputTPM, "")
	fs.IntVar(&o.Limits.OutputTPM, "output-tpm", tier.OutputTPM, "")
	fs.IntVar(&o.Limits.MaxConcurrency, "max-concurrency", config.DefaultMaxConcurrency, "")
	fs.IntVar(&o.ReplyTokens, "reply-tokens", loadtest.DefaultReplyTokens, "")
	fs.IntVar(&o.MaxTokens, "max-tokens", 0, "")
	fs.IntVar(&o.PromptBytes, "prompt-bytes", loadtest.DefaultPromptBytes, "")
	fs.IntVar(&o.PrefixBytes, "prefix-bytes", loadtest.DefaultPrefixBytes, "")
	fs.DurationVar(&o.Timeout, "timeout", loadtest.DefaultTimeout, "")
	fs.Uint64Var(&o.Seed, "seed", 1, "")
	asJSON := fs.Bool("json", false, "")
	var ip inProcessOptions
	fs.Float64Var(&ip.tokensPerSecond, "tokens-per-second", 60, "")
	fs.DurationVar(&ip.latency, "latency", 300*time.Millisecond, "")
	fs.IntVar(&ip.workers, "workers", 0, "")
	fs.DurationVar(&ip.batchDelay, "batch-delay", 3*time.Second, "")
	logPath := fs.String("log", "", "")
	verbose := fs.Bool("v", false, "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("loadtest: unexpected arguments %q", fs.Args())
	}
	if o.Scenario == "" {
		fs.Usage()
		return errors.New("loadtest: --scenario is required (classroom, heavy-vs-light, classes, saturate, long-answers, cached-classroom, mixed-cache or batch)")
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	preset := func(name string, v *int, def int) {
		if !set[name] {
			*v = def
		}
	}
	switch o.Scenario {
	case loadtest.CachedClassroom:
		preset("rpm", &o.Limits.RPM, 120)
		preset("input-tpm", &o.Limits.InputTPM, 60000)
		preset("output-tpm", &o.Limits.OutputTPM, 100000)
		preset("max-concurrency", &o.Limits.MaxConcurrency, 16)
		preset("users", &o.Users, 30)
	case loadtest.MixedCache:
		preset("rpm", &o.Limits.RPM, 1000)
		preset("input-tpm", &o.Limits.InputTPM, 60000)
		preset("output-tpm", &o.Limits.OutputTPM, 1000000)
		preset("max-concurrency", &o.Limits.MaxConcurrency, 16)
		preset("users", &o.Users, 20)
	case loadtest.LongAnswers:
		preset("rpm", &o.Limits.RPM, 1000)
		preset("input-tpm", &o.Limits.InputTPM, 1000000)
		preset("output-tpm", &o.Limits.OutputTPM, 8000)
		preset("max-concurrency", &o.Limits.MaxConcurrency, 16)
		preset("reply-tokens", &o.ReplyTokens, 1000)
		preset("max-tokens", &o.MaxTokens, 8192)
		preset("users", &o.Users, 10)
		if !set["tokens-per-second"] {
			ip.tokensPerSecond = 50
		}
	case loadtest.Batch:
		preset("rpm", &o.Limits.RPM, 1000)
		preset("input-tpm", &o.Limits.InputTPM, 1000000)
		preset("output-tpm", &o.Limits.OutputTPM, 1000000)
		preset("max-concurrency", &o.Limits.MaxConcurrency, 16)
		preset("users", &o.Users, loadtest.DefaultBatchUsers)
		preset("requests-per-user", &o.RequestsPerUser, loadtest.DefaultBatchJobs)
		preset("reply-tokens", &o.ReplyTokens, 200)
		preset("max-tokens", &o.MaxTokens, loadtest.DefaultBatchMaxTokens)
		ip.batch = true
	}
	if o.Warmup == 0 {
		o.Warmup = loadtest.NoWarmup // Options reads 0 as "the default"
	}
	o.Progress = stderr

	if o.BaseURL == "" {
		if ip.workers < 0 || ip.tokensPerSecond < 0 || ip.latency < 0 || ip.batchDelay < 0 {
			return errors.New("loadtest: --workers, --tokens-per-second, --latency and --batch-delay must not be negative")
		}
		ip.limits = o.Limits
		ip.replyTokens = o.ReplyTokens
		ip.logs = io.Discard
		switch {
		case *verbose:
			ip.logs = stderr
		case *logPath != "":
			f, err := os.Create(*logPath)
			if err != nil {
				return fmt.Errorf("loadtest: --log: %w", err)
			}
			defer f.Close()
			ip.logs = f
		}
		env, err := startInProcess(ctx, ip, getenv, stderr)
		if err != nil {
			return err
		}
		defer env.stop()
		o.BaseURL, o.Key, o.FakeURL, o.Target = env.base, env.key, env.fakeURL, "in-process"
		fmt.Fprintf(stderr, "loadtest: in-process sluice at %s, fake upstream at %s\n", env.base, env.fakeURL)
	} else if o.Key == "" {
		return errors.New("loadtest: --url needs --key (or SLUICE_KEY): a tenant key of that sluice")
	}

	rep, err := loadtest.Run(ctx, o)
	if err != nil {
		return fmt.Errorf("loadtest: %w", err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return rep.WriteTable(stdout)
}

// inProcessOptions shape the sluice that loadtest starts for itself.
type inProcessOptions struct {
	limits          loadtest.Limits
	replyTokens     int
	tokensPerSecond float64
	latency         time.Duration
	workers         int       // extra worker-only roles
	logs            io.Writer // sluice's logs
	// batch turns batches on for the model group (batch's scenario), the
	// fake processing each batch for batchDelay.
	batch      bool
	batchDelay time.Duration
}

// inProcess is a running sluice with its Redis and fake upstream.
type inProcess struct {
	base, key, fakeURL string
	stop               func()
}

// startInProcess starts a Redis, the fake upstream and sluice (api and
// worker, plus extra workers) in this process, all on loopback ports chosen
// by the system. stop tears them down in reverse order, each within a
// bounded time.
func startInProcess(ctx context.Context, o inProcessOptions, getenv func(string) string, stderr io.Writer) (_ *inProcess, err error) {
	var stops []func()
	stopAll := func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}
	defer func() {
		if err != nil {
			stopAll()
		}
	}()

	dir, err := os.MkdirTemp("", "sluice-loadtest-")
	if err != nil {
		return nil, fmt.Errorf("loadtest: temporary folder: %w", err)
	}
	stops = append(stops, func() { _ = os.RemoveAll(dir) })
	redisURL := getenv("REDIS_URL")
	if redisURL == "" {
		url, stop, _, err := devRedis(dir, stderr)
		if err != nil {
			return nil, err
		}
		stops = append(stops, stop)
		redisURL = url
	}

	fake, err := fakeanthropic.New(fakeanthropic.Config{
		Groups: []fakeanthropic.Group{{Name: "claude", Models: []string{"claude-*"},
			RPM: o.limits.RPM, InputTPM: o.limits.InputTPM, OutputTPM: o.limits.OutputTPM}},
		TokensPerSecond: o.tokensPerSecond, Latency: o.latency, ReplyTokens: o.replyTokens,
		BatchDelay: o.batchDelay,
	})
	if err != nil {
		return nil, fmt.Errorf("loadtest: fake upstream: %w", err)
	}
	fln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	fsrv := &http.Server{Handler: fake, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = fsrv.Serve(fln) }()
	stops = append(stops, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if fsrv.Shutdown(sctx) != nil {
			_ = fsrv.Close() // answers still streaming to a stopped worker
		}
	})
	fakeURL := "http://" + fln.Addr().String()

	key := "sk-loadtest-" + randomHex(16)
	env := func(name string) string {
		switch name {
		case "REDIS_URL":
			return redisURL
		case "REDIS_MODE": // with the caller's REDIS_URL only
			if getenv("REDIS_URL") != "" {
				return getenv(name)
			}
		case "ANTHROPIC_BASE_URL":
			return fakeURL
		case "ANTHROPIC_API_KEY":
			return "sk-fake-loadtest" // the fake wants some key
		case "SLUICE_LOG_FORMAT", "SLUICE_LOG_LEVEL":
			return getenv(name)
		}
		return ""
	}
	cfg, err := config.Parse([]byte(loadtestConfig(key, o.limits, o.batch)), env)
	if err != nil {
		return nil, fmt.Errorf("loadtest: configuration:\n%w", err)
	}
	cfg.Listen, cfg.WorkerListen = "127.0.0.1:0", "127.0.0.1:0"

	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	stops = append(stops, func() {
		cancel()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			fmt.Fprintln(stderr, "loadtest: the in-process sluice did not stop within 30s")
		}
	})
	type started struct {
		addr string
		err  error
	}
	start := func(c *config.Config, r roles) (string, error) {
		ready := make(chan started, 2)
		wg.Go(func() {
			err := serve(sctx, c, r, io.Discard, o.logs, func(addr string) { ready <- started{addr: addr} })
			if err == nil {
				err = errors.New("stopped before it was ready")
			}
			ready <- started{err: err}
		})
		select {
		case s := <-ready:
			return s.addr, s.err
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	addr, err := start(cfg, roles{api: true, worker: true, fakeUpstream: true})
	if err != nil {
		return nil, fmt.Errorf("loadtest: starting sluice: %w", err)
	}
	for range o.workers {
		c := *cfg
		if _, err := start(&c, roles{worker: true}); err != nil {
			return nil, fmt.Errorf("loadtest: starting a worker: %w", err)
		}
	}
	return &inProcess{base: "http://" + addr, key: key, fakeURL: fakeURL, stop: stopAll}, nil
}

// loadtestConfig is the in-process sluice's configuration: one group for
// every claude-* model with the given limits, one tenant whose users may
// queue without limit and wait as long as it takes (the scenarios shape
// their own backlogs: heavy-vs-light's 500 jobs are really queued), short
// shutdown budgets (the run is over; queued work is thrown away with the
// Redis). With batch the group sends background jobs that can wait through
// the Message Batches API, collecting them for 2s and checking a batch
// every 500ms, so that a run takes seconds.
func loadtestConfig(tenantKey string, l loadtest.Limits, batch bool) string {
	batchFields := ""
	if batch {
		batchFields = "    batch: true\n    batch_window: 2s\n    batch_poll: 500ms\n"
	}
	return fmt.Sprintf(`# sluice loadtest's in-process configuration
tenants:
  - name: loadtest
    keys: [%q]
    max_queued: 0
    max_wait: 0s
model_groups:
  - name: claude
    models: ["claude-*"]
    rpm: %d
    input_tpm: %d
    output_tpm: %d
    max_concurrency: %d
%sapi:
  shutdown_timeout: 2s
worker:
  shutdown_timeout: 2s
`, tenantKey, l.RPM, l.InputTPM, l.OutputTPM, l.MaxConcurrency, batchFields)
}
