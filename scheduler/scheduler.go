// Package scheduler is sluice's engine: per-user fair queues, the global
// RPM/ITPM/OTPM limiter with concurrency leases, positions and etas, and the
// dispatcher that turns queued jobs into asynq tasks exactly when the
// upstream has room for them.
//
// Every decision that reads and writes shared state is one Lua script
// (lua/*.lua, each prefixed with lua/prelude.lua) with Redis TIME as the
// clock, so any number of api and worker processes can share one Redis.
package scheduler

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/pricing"
	"github.com/sluice-dev/sluice/redisconn"
)

var (
	//go:embed lua/prelude.lua
	prelude string
	//go:embed lua/quota.lua
	quotaSrc string
	//go:embed lua/budget.lua
	budgetSrc string
	//go:embed lua/cached.lua
	cachedSrc string
	//go:embed lua/admit.lua
	admitSrc string
	//go:embed lua/dispatch.lua
	dispatchSrc string
	//go:embed lua/settle.lua
	settleSrc string
	//go:embed lua/observe.lua
	observeSrc string
	//go:embed lua/freeze.lua
	freezeSrc string
	//go:embed lua/renew.lua
	renewSrc string
	//go:embed lua/position.lua
	positionSrc string
	//go:embed lua/gauges.lua
	gaugesSrc string
	//go:embed lua/places.lua
	placesSrc string

	admitScript    = redis.NewScript(prelude + admitSrc)
	quotaScript    = redis.NewScript(prelude + quotaSrc)
	budgetScript   = redis.NewScript(prelude + budgetSrc)
	cachedScript   = redis.NewScript(prelude + cachedSrc)
	dispatchScript = redis.NewScript(prelude + dispatchSrc)
	settleScript   = redis.NewScript(prelude + settleSrc)
	observeScript  = redis.NewScript(prelude + observeSrc)
	freezeScript   = redis.NewScript(prelude + freezeSrc)
	renewScript    = redis.NewScript(prelude + renewSrc)
	positionScript = redis.NewScript(prelude + positionSrc)
	placesScript   = redis.NewScript(prelude + placesSrc)
	gaugesScript   = redis.NewScript(prelude + gaugesSrc)
)

// DefaultLeaseTTL is how long a concurrency lease lasts without a heartbeat:
// the slot of a worker killed mid-call returns (and its job is queued again)
// within this time.
const DefaultLeaseTTL = 15 * time.Second

// Options tune a Scheduler.
type Options struct {
	LeaseTTL time.Duration // default DefaultLeaseTTL
	// MaxOutage is how long a group may stay in outage before its waiting
	// jobs fail (config upstream.max_outage); default 15m.
	MaxOutage time.Duration
	// Clock, when set, replaces Redis TIME in every script (tests).
	Clock func() time.Time
	// Wait, when not nil, follows each admission and each job's end with
	// WAIT on the same connection (config redis.wait_replicas).
	Wait *redisconn.Waiter
	// Log gets what the scheduler cannot return (a quota it could not give
	// back after a step that succeeded); default: discarded.
	Log *slog.Logger
}

// Scheduler runs the engine's scripts.
type Scheduler struct {
	rdb       redis.UniversalClient
	cluster   bool // rdb is a cluster client: a script's keys share one slot
	store     *jobs.Store
	lease     time.Duration
	maxOutage time.Duration
	clock     func() time.Time
	wait      *redisconn.Waiter
	log       *slog.Logger
	lines     sync.Map // group name → *admitLine (admitline.go)
}

// New returns a Scheduler on rdb; store supplies job-record settings.
func New(rdb redis.UniversalClient, store *jobs.Store, o Options) *Scheduler {
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = DefaultLeaseTTL
	}
	if o.MaxOutage <= 0 {
		o.MaxOutage = config.DefaultMaxOutage
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	_, cluster := rdb.(*redis.ClusterClient)
	return &Scheduler{rdb: rdb, cluster: cluster, store: store, lease: o.LeaseTTL, maxOutage: o.MaxOutage, clock: o.Clock, wait: o.Wait, log: o.Log}
}

// LeaseTTL is the lease time; workers renew at a third of it.
func (s *Scheduler) LeaseTTL() time.Duration { return s.lease }

// now is the clock argument of the scripts: 0 means Redis TIME.
func (s *Scheduler) now() int64 {
	if s.clock == nil {
		return 0
	}
	return s.clock().UnixMilli()
}

// keys of a group's engine state. live is the hash of the group's jobs
// admitted and not ended (id → status initial and user key): the safety
// net that finds jobs a lost key left in no queue (lua/dispatch.lua's
// sweep); it lies outside sluice:fq:<g>:* so that losing those keys
// together does not lose it too.
type keys struct{ g string }

func (k keys) p(s string) string      { return rkeys.FQ(k.g, s) }
func (k keys) order() string          { return k.p("order") }
func (k keys) delayed() string        { return k.p("delayed") }
func (k keys) delayedTags() string    { return k.p("delayed_tags") }
func (k keys) vtime() string          { return k.p("vtime") }
func (k keys) vtimeB() string         { return k.p("vtime_b") }
func (k keys) finish() string         { return k.p("finish") }
func (k keys) costs() string          { return k.p("costs") }
func (k keys) totals() string         { return k.p("totals") }
func (k keys) seq() string            { return k.p("seq") }
func (k keys) dispatching() string    { return k.p("dispatching") }
func (k keys) deadlines() string      { return k.p("deadlines") }
func (k keys) expiring() string       { return k.p("expiring") }
func (k keys) dispatchSeq() string    { return k.p("dispatch_seq") }
func (k keys) lim() string            { return rkeys.Limiter(k.g) }
func (k keys) reservations() string   { return rkeys.Reservations(k.g) }
func (k keys) leases() string         { return rkeys.Leases(k.g) }
func (k keys) seen() string           { return rkeys.HeadersSeen(k.g) }
func (k keys) rate() string           { return k.p("rate") }
func (k keys) live() string           { return rkeys.Live(k.g) }
func (k keys) cache() string          { return rkeys.Cache(k.g) }
func (k keys) batchLine() string      { return k.p("batch_line") }
func (k keys) batchClaims() string    { return k.p("batch_claims") }
func (k keys) batches() string        { return k.p("batches") }
func (k keys) batched() string        { return k.p("batched") }
func wakeChannel(group string) string { return rkeys.Wake(group) }

// MovedChannel is where a group's queue announces that jobs entered or left
// it (dispatched, expired, canceled, back for a retry): the positions of the
// jobs waiting there changed. Arrivals are not announced (a newcomer rarely
// goes ahead of anyone; the periodic check catches it).
func MovedChannel(group string) string { return rkeys.Moved(group) }

// limits are the configured-limit arguments every limiter script takes.
// SetAccountLimits records the account's per-minute limits for group g, as
// the Admin API states them (0: none stated); the limiter uses the lowest
// of these, the configured ones and those the response headers announce.
func (s *Scheduler) SetAccountLimits(ctx context.Context, g *config.ModelGroup, rpm, inputTPM, outputTPM int) error {
	k := keys{g.Name}.lim()
	pipe := s.rdb.TxPipeline()
	for _, f := range []struct {
		field string
		v     int
	}{{"xr", rpm}, {"xi", inputTPM}, {"xo", outputTPM}} {
		if f.v > 0 {
			pipe.HSet(ctx, k, f.field, f.v)
		} else {
			pipe.HDel(ctx, k, f.field)
		}
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("scheduler: account limits %s: %w", g.Name, err)
	}
	return nil
}

// AccountLimits is what SetAccountLimits last recorded for group g (0: none).
func (s *Scheduler) AccountLimits(ctx context.Context, g string) (rpm, inputTPM, outputTPM int, err error) {
	v, err := s.rdb.HMGet(ctx, keys{g}.lim(), "xr", "xi", "xo").Result()
	if err != nil {
		return 0, 0, 0, err
	}
	n := func(x any) int {
		str, _ := x.(string)
		i, _ := strconv.Atoi(str)
		return i
	}
	return n(v[0]), n(v[1]), n(v[2]), nil
}

func outputAccounting(g *config.ModelGroup) string {
	if g.Produced() {
		return config.OutputProduced
	}
	return config.OutputReserved
}

func limits(g *config.ModelGroup) []any {
	return []any{g.RPM, g.InputTPM, g.OutputTPM, g.Burst.Milliseconds()}
}

// UserKey identifies a user within the fair queue: tenant and user id.
func UserKey(tenant, user string) string { return tenant + "\x00" + user }

// quotaKey is the hash of a user's quota buckets. Tenant names hold no ':',
// so the key is unambiguous whatever the user id holds.
func quotaKey(tenant, user string) string { return rkeys.Quota(tenant, user) }

func idempotencyKey(g, tenant, user, key string) string {
	return rkeys.Idempotency(g, tenant, user, key)
}

// IdempotencyTTL is how long an Idempotency-Key is remembered.
const IdempotencyTTL = 24 * time.Hour

// Admission is a job to admit and the policy it is admitted under.
type Admission struct {
	Job           *jobs.Job
	Group         *config.ModelGroup
	InputEstimate int
	// CachePrefixes are the request's cacheable prefixes (none: no
	// prompt caching): the input the upstream reads from its cache is not
	// reserved, and jobs sharing a prefix not yet cached wait for one
	// call to write it (model_groups[].cache_hold).
	CachePrefixes []CachePrefix
	Policy        config.UserPolicy // the user's weight, quotas, queue cap
	MaxWait       time.Duration     // 0 = no limit
	// IdempotencyKey (optional) with the hash of the request body.
	IdempotencyKey, BodyHash string
	// Budget is the dollar budgets the job is charged against (none: no
	// budget applies).
	Budget Budget
	// BatchFallback, when > 0, sends the job by the Message Batches API:
	// it waits in the group's batch line, and joins the Messages line
	// this long after admission if no batch took it by then (see Batch).
	BatchFallback time.Duration
}

// Budget is what a job is charged against in dollars: its user's and its
// tenant's budgets per UTC day and month, in µ$ (0 = none), and its
// model's price, which turns the job's worst case (its input estimate,
// the part the upstream holds cached at the cache-read price, and
// max_tokens of output) into the µ$ it reserves.
type Budget struct {
	UserDay, UserMonth, TenantDay, TenantMonth int64
	Price                                      pricing.Price
}

func (b Budget) any() bool {
	return b.UserDay > 0 || b.UserMonth > 0 || b.TenantDay > 0 || b.TenantMonth > 0
}

// BudgetRefusal says which budget refused a job, for the 429's sentence.
type BudgetRefusal struct {
	Scope  string    // "user" or "tenant"
	Period string    // "day" or "month"
	Limit  int64     // µ$
	Used   int64     // µ$ spent and held when the job asked
	Ask    int64     // µ$ the job would have held
	Renews time.Time // when the period ends (UTC)
}

// Outcome is what admission decided.
type Outcome string

const (
	Admitted   Outcome = "ok"
	Replay     Outcome = "replay"      // the Idempotency-Key named an earlier job: ReplayOf
	Conflict   Outcome = "conflict"    // the Idempotency-Key was used with another body
	OverQuota  Outcome = "quota"       // QuotaWhich is "requests" or "tokens"; RetryAfter when it fits
	OverBudget Outcome = "budget"      // Budget says which; RetryAfter is its renewal
	QueueLimit Outcome = "queue_limit" // Queued of Limit jobs already waiting
	Overloaded Outcome = "overloaded"  // ETA beyond MaxWait
	// Unavailable: the group's outage outlasted upstream.max_outage;
	// RetryAfter is when the next probe goes, Down how long it has lasted.
	Unavailable Outcome = "unavailable"
)

// AdmitResult is admission's answer.
type AdmitResult struct {
	Outcome    Outcome
	Position   int
	ETA        int // seconds
	ReplayOf   string
	QuotaWhich string
	RetryAfter time.Duration
	Limit      int // the quota's hourly figure, or the queue cap
	Remaining  int // the quota's remaining (floor), or jobs queued
	// The request quota after admission (RequestsPerHour > 0): remaining
	// and seconds until full, for the RateLimit-* headers.
	QuotaRemaining, QuotaReset int
	MaxWait                    int // seconds, for Overloaded
	Down                       time.Duration
	Budget                     BudgetRefusal // for OverBudget
	// Batch: the job was admitted to wait for a batch (no position).
	Batch bool
}

// Admit decides a job's admission and, when it is admitted, stores it and
// queues it fairly — one atomic script in the group's slot. The user's
// quotas live in the user's own slot (every group charges them). On one
// Redis (single or Sentinel) the admission script checks and charges them
// itself, in the same step. In a cluster, or when the job also holds
// dollar budgets (charged in the user's and the tenant's slots in between),
// they are charged first, in a script of their own, and given back when
// admission refuses. A refusal changes nothing else.
func (s *Scheduler) Admit(ctx context.Context, a Admission) (AdmitResult, error) {
	j, g := a.Job, a.Group
	j.Status = jobs.Queued
	idem := rkeys.NoIdempotency(g.Name)
	if a.IdempotencyKey != "" {
		idem = idempotencyKey(g.Name, j.Tenant, j.UserID, a.IdempotencyKey)
	} else {
		a.BodyHash = ""
	}
	deadline := int64(0)
	if !j.DeadlineAt.IsZero() {
		deadline = j.DeadlineAt.UnixMilli()
	}
	weight := a.Policy.Weight
	if weight <= 0 {
		weight = 1
	}
	var (
		held   quotaHold
		r      AdmitResult
		quotas = "" // the user's quotas, when the admission script charges them
	)
	if p := a.Policy; (p.RequestsPerHour > 0 || p.TokensPerHour > 0) && !a.Budget.any() && !s.cluster {
		quotas = strconv.Itoa(max(0, p.RequestsPerHour)) + "," + strconv.Itoa(max(0, p.TokensPerHour))
	} else {
		cached, err := s.cachedInput(ctx, a)
		if err != nil {
			return AdmitResult{}, err
		}
		if held, r, err = s.takeQuota(ctx, a, cached); err != nil || r.Outcome == OverQuota {
			return s.replayFirst(ctx, idem, a.BodyHash, r, err)
		}
		if a.Budget.any() {
			if r, err = s.takeBudgets(ctx, a, cached, &held, r); err != nil || r.Outcome == OverBudget {
				s.giveQuota(ctx, j, held, Used{}, a.Policy)
				return s.replayFirst(ctx, idem, a.BodyHash, r, err)
			}
		}
	}
	now, prefixes := s.now(), encodePrefixes(a.CachePrefixes)
	fields := s.store.Fields(j)
	if now == 0 {
		// admit.lua stamps created_at on Redis's clock.
		fields = withoutField(fields, "created_at")
	}
	if prefixes != "" {
		fields = append(fields, "c_pre", prefixes)
	}
	if held.usd > 0 {
		fields = append(fields, "q_usd", held.usd, "b_d", held.day, "b_m", held.month)
	}
	out, err := s.runAdmit(ctx, admitIn{
		Now: now, Group: g, Job: j,
		Idempotency: idem, BodyHash: a.BodyHash, IdempotencyTTL: int(IdempotencyTTL / time.Second),
		TTL: s.store.TTLSeconds(), Prefixes: prefixes, Input: a.InputEstimate, Weight: weight,
		HeldRequests: held.requests, HeldTokens: held.tokens, Quotas: quotas,
		MaxQueued: a.Policy.MaxQueued, MaxWait: a.MaxWait.Milliseconds(), Deadline: deadline,
		BatchFallback: a.BatchFallback.Milliseconds(), Fields: fields,
	})
	if err != nil {
		// Whether the job was admitted is unknown: its quota stays
		// charged (a user may lose one request's worth, never gain one).
		return AdmitResult{}, fmt.Errorf("scheduler: admit %s: %w", j.ID, err)
	}
	r.Outcome = out.Outcome
	if r.Outcome != Admitted && held.any() {
		s.giveQuota(ctx, j, held, Used{}, a.Policy)
	}
	switch r.Outcome {
	case Admitted:
		r.Position, r.ETA = out.Position, out.ETA
		if r.ETA == -2 {
			r.Position, r.ETA, r.Batch = 0, 0, true
		}
		if quotas != "" {
			r.QuotaRemaining, r.QuotaReset = out.QuotaRemaining, out.QuotaReset
		}
		j.CostIn, j.CostOut = a.InputEstimate, j.MaxTokens
		if out.CreatedAt > 0 {
			j.CreatedAt = time.UnixMilli(out.CreatedAt).UTC()
		}
	case OverQuota:
		r.overQuota(out.Which, out.RetryMS, out.Limit, out.Remaining)
	case Replay:
		r.ReplayOf = out.ReplayOf
	case QueueLimit:
		r.Remaining, r.Limit = out.Queued, out.Limit
	case Overloaded:
		r.ETA, r.MaxWait = out.ETA, out.MaxWait
	case Unavailable:
		r.RetryAfter = time.Duration(out.RetryMS) * time.Millisecond
		r.Down = time.Duration(out.DownMS) * time.Millisecond
	}
	return r, nil
}

// withoutField is fields (name, value pairs) less the pair named name.
func withoutField(fields []any, name string) []any {
	for i := 0; i+1 < len(fields); i += 2 {
		if fields[i] == name {
			return append(fields[:i:i], fields[i+2:]...)
		}
	}
	return fields
}

// replayFirst turns a quota or budget refusal r (charged before the
// admission script) into what that script would have answered first: the
// earlier job of a retried Idempotency-Key, or a conflict when the key came
// with another body. A retry is never charged, nor refused for a quota the
// first request used up. bodyHash is "" when the request has no key.
func (s *Scheduler) replayFirst(ctx context.Context, idem, bodyHash string, r AdmitResult, err error) (AdmitResult, error) {
	if err != nil || bodyHash == "" {
		return r, err
	}
	prev, gerr := s.rdb.Get(ctx, idem).Result()
	if gerr != nil { // redis.Nil: the key is new; otherwise the refusal stands
		return r, nil
	}
	id, hash, _ := strings.Cut(prev, "|")
	if hash != bodyHash {
		return AdmitResult{Outcome: Conflict}, nil
	}
	return AdmitResult{Outcome: Replay, ReplayOf: id}, nil
}

// overQuota makes r a refusal for the user's quota which ("requests" or
// "tokens"), which can hold the job after retryMS; limit is its hourly
// figure, remaining its bucket's level.
func (r *AdmitResult) overQuota(which string, retryMS int64, limit, remaining int) {
	r.Outcome, r.QuotaWhich = OverQuota, which
	r.RetryAfter = time.Duration(retryMS) * time.Millisecond
	r.Limit, r.Remaining = limit, remaining
}

// quotaHold is what a job holds of its user's quotas and of its dollar
// budgets (usd µ$ in the periods day and month), and, at its end, what its
// calls cost (µ$).
type quotaHold struct {
	requests, tokens int
	usd, cost        int64
	day, month       string
}

func (h quotaHold) any() bool { return h.requests > 0 || h.tokens > 0 || h.usd > 0 }

// cachedInput is how much of a job's input the upstream holds cached now
// (0 without cacheable prefixes, or when the group counts cache reads),
// for the quota's and the budget's charges.
func (s *Scheduler) cachedInput(ctx context.Context, a Admission) (int, error) {
	if len(a.CachePrefixes) == 0 || a.Group.CountCacheReads || (a.Policy.TokensPerHour <= 0 && !a.Budget.any()) {
		return 0, nil
	}
	cached, err := runInt(ctx, s.rdb, cachedScript, cachedIn{Now: s.now(), Group: a.Group.Name, Prefixes: encodePrefixes(a.CachePrefixes)})
	if err != nil {
		return 0, fmt.Errorf("scheduler: admit %s: cached input: %w", a.Job.ID, err)
	}
	return max(0, min(int(cached), a.InputEstimate-1)), nil
}

// budgetPeriods are the stamps of the UTC day and month of t, and when
// each ends.
func budgetPeriods(t time.Time) (day, month string, dayEnd, monthEnd time.Time) {
	t = t.UTC()
	d := time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, time.UTC)
	m := time.Date(t.Year(), t.Month(), 1, 0, 0, 0, 0, time.UTC)
	return d.Format("20060102"), m.Format("200601"), d.AddDate(0, 0, 1), m.AddDate(0, 1, 0)
}

// takeBudgets reserves the job's worst-case cost in its user's budgets,
// then its tenant's (each a script in its own slot); a refusal gives back
// what was taken. It fills held's µ$ and periods.
func (s *Scheduler) takeBudgets(ctx context.Context, a Admission, cached int, held *quotaHold, r AdmitResult) (AdmitResult, error) {
	j, b := a.Job, a.Budget
	cost := b.Price.MicroUSD(pricing.Usage{InputTokens: a.InputEstimate - cached, CacheReadTokens: cached, OutputTokens: j.MaxTokens})
	now := s.wallClock()
	day, month, dayEnd, monthEnd := budgetPeriods(now)
	scopes := []struct {
		scope            string
		dayKey, monthKey string
		mark             string
		dl, ml           int64
	}{
		{"user", rkeys.UserBudget(j.Tenant, j.UserID, "d", day), rkeys.UserBudget(j.Tenant, j.UserID, "m", month),
			rkeys.UserBudgetGiven(j.Tenant, j.UserID, j.ID), b.UserDay, b.UserMonth},
		{"tenant", rkeys.TenantBudget(j.Tenant, "d", day), rkeys.TenantBudget(j.Tenant, "m", month),
			rkeys.TenantBudgetGiven(j.Tenant, j.ID), b.TenantDay, b.TenantMonth},
	}
	for i, sc := range scopes {
		if sc.dl <= 0 && sc.ml <= 0 {
			continue
		}
		out, err := s.runBudgetTake(ctx, budgetTakeIn{DayKey: sc.dayKey, MonthKey: sc.monthKey, Mark: sc.mark,
			DayLimit: sc.dl, MonthLimit: sc.ml, Amount: cost})
		if err == nil && out.Outcome == OverBudget {
			r.Outcome = OverBudget
			r.Budget = BudgetRefusal{Scope: sc.scope, Period: out.Period, Limit: out.Limit, Used: out.Used, Ask: cost, Renews: dayEnd}
			if r.Budget.Period == "month" {
				r.Budget.Renews = monthEnd
			}
			r.RetryAfter = r.Budget.Renews.Sub(now)
		}
		if err != nil || r.Outcome == OverBudget {
			// Give back the scopes taken before this one.
			for _, prev := range scopes[:i] {
				if prev.dl > 0 || prev.ml > 0 {
					s.giveBudget(ctx, j, prev.dayKey, prev.monthKey, prev.mark, cost, 0)
				}
			}
			if err != nil {
				return r, fmt.Errorf("scheduler: admit %s: budget: %w", j.ID, err)
			}
			return r, nil
		}
	}
	held.usd, held.day, held.month = cost, day, month
	return r, nil
}

// BudgetUse is one budget's state: µ$ spent and held in its period, and
// when the period ends.
type BudgetUse struct {
	Used   int64
	Renews time.Time
}

// Budgets reads a user's and its tenant's budget counters of the current
// UTC day and month: user day, user month, tenant day, tenant month.
func (s *Scheduler) Budgets(ctx context.Context, tenant, user string) ([4]BudgetUse, error) {
	var out [4]BudgetUse
	day, month, dayEnd, monthEnd := budgetPeriods(s.wallClock())
	ks := []string{rkeys.UserBudget(tenant, user, "d", day), rkeys.UserBudget(tenant, user, "m", month),
		rkeys.TenantBudget(tenant, "d", day), rkeys.TenantBudget(tenant, "m", month)}
	p := s.rdb.Pipeline()
	cmds := make([]*redis.StringCmd, len(ks))
	for i, k := range ks {
		cmds[i] = p.Get(ctx, k)
	}
	if _, err := p.Exec(ctx); err != nil && err != redis.Nil {
		return out, err
	}
	for i, c := range cmds {
		n, _ := strconv.ParseInt(c.Val(), 10, 64)
		out[i] = BudgetUse{Used: n, Renews: dayEnd}
		if i%2 == 1 {
			out[i].Renews = monthEnd
		}
	}
	return out, nil
}

// giveBudget settles a hold of held µ$ in one scope to cost, once (the
// mark); tried three times, then logged: the budget stays charged.
func (s *Scheduler) giveBudget(ctx context.Context, j *jobs.Job, dayKey, monthKey, mark string, held, cost int64) {
	ctx = context.WithoutCancel(ctx)
	var err error
	for try := 0; try < 3; try++ {
		if _, err = runInt(ctx, s.rdb, budgetScript, budgetGiveIn{DayKey: dayKey, MonthKey: monthKey, Mark: mark, Held: held, Cost: cost}); err == nil {
			return
		}
	}
	s.log.Warn("could not settle a job's dollar budget hold; the budget stays charged with its worst case",
		"job_id", j.ID, "tenant", j.Tenant, "err", err)
}

// giveBudgets settles a job's budget holds in its user's and tenant's
// scopes to what its calls cost.
func (s *Scheduler) giveBudgets(ctx context.Context, j *jobs.Job, held quotaHold) {
	if held.usd <= 0 || held.day == "" {
		return
	}
	s.giveBudget(ctx, j, rkeys.UserBudget(j.Tenant, j.UserID, "d", held.day), rkeys.UserBudget(j.Tenant, j.UserID, "m", held.month),
		rkeys.UserBudgetGiven(j.Tenant, j.UserID, j.ID), held.usd, held.cost)
	s.giveBudget(ctx, j, rkeys.TenantBudget(j.Tenant, "d", held.day), rkeys.TenantBudget(j.Tenant, "m", held.month),
		rkeys.TenantBudgetGiven(j.Tenant, j.ID), held.usd, held.cost)
}

// takeQuota charges the user's quotas for a job about to be admitted: one
// request, and the tokens the limiter will count (input not read from the
// upstream's cache, plus max_tokens). A user without quotas costs no call.
// It answers OverQuota in r when a bucket cannot hold the job.
func (s *Scheduler) takeQuota(ctx context.Context, a Admission, cached int) (held quotaHold, r AdmitResult, err error) {
	j, p := a.Job, a.Policy
	if p.RequestsPerHour <= 0 && p.TokensPerHour <= 0 {
		return held, r, nil
	}
	cost := a.InputEstimate + j.MaxTokens - cached
	out, err := s.runQuotaTake(ctx, quotaTakeIn{Now: s.now(), Job: j,
		RequestsPerHour: p.RequestsPerHour, TokensPerHour: p.TokensPerHour, Tokens: cost})
	if err != nil {
		return held, r, fmt.Errorf("scheduler: admit %s: quota: %w", j.ID, err)
	}
	if out.Outcome == OverQuota {
		r.overQuota(out.Which, out.RetryMS, out.Limit, out.Remaining)
		return held, r, nil
	}
	r.QuotaRemaining, r.QuotaReset = out.QuotaRemaining, out.QuotaReset
	if p.RequestsPerHour > 0 {
		held.requests = 1
	}
	if p.TokensPerHour > 0 {
		held.tokens = cost
	}
	return held, r, nil
}

// giveQuota gives back to job j's user what its hold did not use, once
// per job (the mark in the user's slot makes a repeated call harmless, so
// a failed call is tried again). It follows the step that took the hold
// out of the job's record; when Redis cannot be reached it is logged and
// the user's buckets stay charged until they refill.
func (s *Scheduler) giveQuota(ctx context.Context, j *jobs.Job, held quotaHold, u Used, p config.UserPolicy) {
	ctx = context.WithoutCancel(ctx)
	s.giveBudgets(ctx, j, held)
	if held.requests <= 0 && held.tokens <= 0 {
		return
	}
	var err error
	for try := 0; try < 3; try++ {
		_, err = runInt(ctx, s.rdb, quotaScript, quotaGiveIn{Now: s.now(), Job: j, RequestsPerHour: p.RequestsPerHour, TokensPerHour: p.TokensPerHour,
			HeldRequests: held.requests, HeldTokens: held.tokens, UsedRequests: min(u.Requests, 1), UsedTokens: u.Input + u.Output})
		if err == nil {
			return
		}
	}
	s.log.Warn("could not give back a job's unused quota; the user's buckets refill within the hour",
		"job_id", j.ID, "tenant", j.Tenant, "err", err)
}

// Quota is a user's quota state, brought up to now.
type Quota struct {
	Limit     int       // the hourly figure; 0 = unlimited
	Remaining int       // floor of the bucket's level
	ResetAt   time.Time // when the bucket is full again
}

// Quotas reads a user's request and token quotas.
func (s *Scheduler) Quotas(ctx context.Context, tenant, user string, p config.UserPolicy) (requests, tokens Quota, err error) {
	h, err := s.rdb.HMGet(ctx, quotaKey(tenant, user), "r", "t", "ts").Result()
	if err != nil {
		return requests, tokens, err
	}
	now, err := s.nowTime(ctx)
	if err != nil {
		return requests, tokens, err
	}
	f := func(v any, def float64) float64 {
		if v == nil {
			return def
		}
		n, err := strconv.ParseFloat(fmt.Sprint(v), 64)
		if err != nil {
			return def
		}
		return n
	}
	ts := f(h[2], float64(now.UnixMilli()))
	dt := max(0, float64(now.UnixMilli())-ts)
	level := func(v any, perHour int) Quota {
		if perHour <= 0 {
			return Quota{}
		}
		c := float64(perHour)
		l := min(c, f(v, c)+c/3600000*dt)
		secs := (c - l) / (c / 3600)
		return Quota{Limit: perHour, Remaining: int(l), ResetAt: now.Add(time.Duration(secs * float64(time.Second))).UTC()}
	}
	return level(h[0], p.RequestsPerHour), level(h[1], p.TokensPerHour), nil
}

// Position is a queued job's place in its group's fair order (1 = next)
// and its eta; ok is false when the job is not waiting in the queue (it was
// dispatched, or is waiting to retry).
func (s *Scheduler) Position(ctx context.Context, j *jobs.Job, g *config.ModelGroup) (position, eta int, ok bool, err error) {
	if j.FQMember == "" {
		return 0, 0, false, nil
	}
	out, err := s.runPosition(ctx, positionIn{Now: s.now(), Group: g, Member: j.FQMember})
	if err != nil {
		return 0, 0, false, fmt.Errorf("scheduler: position of %s: %w", j.ID, err)
	}
	if out.Position == 0 {
		return 0, 0, false, nil
	}
	return out.Position, out.ETA, true, nil
}

// State says why a dispatch round stopped.
type State string

const (
	More  State = "more"  // the pick limit was reached: go again at once
	Wait  State = "wait"  // the next job fits after Result.Wait
	Full  State = "full"  // every concurrency slot is taken
	Empty State = "empty" // nothing queued (Result.Wait: the next retry, or -1)
	// Down: the group is in outage; Result.Wait is when the next probe may
	// go (a job picked in this round is the probe).
	Down State = "down"
	// Probe: the group is in outage, a probe is due and no job waits to
	// be it: the caller probes the upstream without a job (a free
	// count_tokens call about Result.ProbeModel) and reports the outcome
	// with Observe (answered) or ProbeFailed.
	Probe State = "probe"
	// Hold: every job that could go waits for another job's call to write
	// a prompt-cache prefix they share; Result.Wait is when the first hold
	// ends (the dispatchers are woken sooner when that call's answer
	// begins).
	Hold State = "hold"
)

// Picked is a job handed out by a dispatch round.
type Picked struct {
	JobID    string `redis:"job"`
	Dispatch int    `redis:"dispatch"`
}

// Result of one dispatch round.
type Result struct {
	State    State
	Wait     time.Duration
	Jobs     []Picked
	Expiring int // jobs past their deadline waiting to be expired (Expiring)
	// ProbeModel is the model a jobless probe asks about (State Probe): the
	// model of the last job the upstream failed; "" when none is known.
	ProbeModel string
}

// Dispatch picks up to max jobs of group g in fair order that the limiter
// has room for, reserving for each and leasing it a concurrency slot.
func (s *Scheduler) Dispatch(ctx context.Context, g *config.ModelGroup, max int) (Result, error) {
	out, err := s.runDispatch(ctx, dispatchIn{Now: s.now(), Group: g, Lease: s.lease.Milliseconds(), Max: max,
		MaxEvents: s.store.MaxEvents(), Away: awayAfter.Milliseconds()})
	if err != nil {
		return Result{}, fmt.Errorf("scheduler: dispatch %s: %w", g.Name, err)
	}
	r := Result{State: out.State, Wait: time.Duration(out.WaitMS) * time.Millisecond, Expiring: out.Expiring}
	if r.State == Probe {
		r.ProbeModel = out.ProbeModel
		return r, nil
	}
	r.Jobs = out.Jobs
	return r, nil
}

// Handed marks a picked job as handed to asynq.
func (s *Scheduler) Handed(ctx context.Context, group string, p Picked) error {
	return s.rdb.ZRem(ctx, keys{group}.dispatching(), p.JobID+"|"+strconv.Itoa(p.Dispatch)).Err()
}

// Unhanded lists jobs picked more than olderThan ago and not yet handed to
// asynq: their dispatcher died between the two steps.
func (s *Scheduler) Unhanded(ctx context.Context, group string, olderThan time.Duration) ([]Picked, error) {
	now, err := s.nowTime(ctx)
	if err != nil {
		return nil, err
	}
	ms, err := s.rdb.ZRangeByScore(ctx, keys{group}.dispatching(), &redis.ZRangeBy{
		Min: "-inf", Max: strconv.FormatInt(now.Add(-olderThan).UnixMilli(), 10),
	}).Result()
	if err != nil {
		return nil, err
	}
	var out []Picked
	for _, m := range ms {
		id, n, ok := strings.Cut(m, "|")
		d, err := strconv.Atoi(n)
		if ok && err == nil {
			out = append(out, Picked{JobID: id, Dispatch: d})
		}
	}
	return out, nil
}

// wallClock is this process's clock (Options.Clock in tests). Budget
// periods are UTC days and months: a clock seconds off at midnight moves
// one job's hold to the neighbouring period, which is cheaper than a Redis
// TIME round trip on every admission.
func (s *Scheduler) wallClock() time.Time {
	if s.clock != nil {
		return s.clock()
	}
	return time.Now()
}

func (s *Scheduler) nowTime(ctx context.Context) (time.Time, error) {
	if s.clock != nil {
		return s.clock(), nil
	}
	return s.rdb.Time(ctx).Result()
}

// Used is what the upstream counted for one call.
type Used struct {
	Requests, Input, Output int
}

// Settlement closes a job's reservations.
type Settlement struct {
	Group *config.ModelGroup
	Job   *jobs.Job
	Used  Used
	// Duration > 0 records a completed call for the throughput estimate.
	Duration time.Duration
	// Final: the job has ended; settle the user's quota too (Policy's).
	Final  bool
	Policy config.UserPolicy
}

// Settle closes the job's limiter reservation (of its current dispatch) and,
// when Final, its hold on the user's quota — each exactly once: the buckets
// get back what the upstream did not use. It also releases the job's lease
// and wakes the dispatchers. It reports which reservations it found.
func (s *Scheduler) Settle(ctx context.Context, st Settlement) (limiter, quota bool, err error) {
	j := st.Job
	out, err := s.runSettle(ctx, settleIn{Now: s.now(), Group: st.Group, JobID: j.ID, Used: st.Used,
		Duration: st.Duration.Milliseconds(), Final: st.Final})
	if err != nil {
		return false, false, fmt.Errorf("scheduler: settle %s: %w", j.ID, err)
	}
	limSettled, quotaTaken := out.Limiter, out.Quota
	if held := out.Hold.hold(); quotaTaken && held.any() {
		owner := *j
		if owner.Tenant == "" {
			owner.Tenant, owner.UserID = s.store.Owner(ctx, j.ID)
		}
		s.giveQuota(ctx, &owner, held, st.Used, st.Policy)
	}
	return limSettled, quotaTaken, nil
}

// PushEvery is the least time between two pushed `queued` events of one
// job (the API promises at most one a second).
const PushEvery = time.Second

// Watched is a waiting job someone follows.
type Watched struct {
	ID, Member string
	Group      *config.ModelGroup
}

// Place is a watched job's place in line: Position 0 means it no longer
// waits in its queue (dispatched, canceled, expired).
type Place struct {
	Position, ETASeconds int
}

// Places reads the place in line of every watched job: the jobs go to Redis
// in batches of placesBatch per group (one read-only script call each, one
// ZRANK per job), all batches in one pipelined round trip.
func (s *Scheduler) Places(ctx context.Context, ws []Watched) ([]Place, error) {
	out := make([]Place, len(ws))
	if len(ws) == 0 {
		return out, nil
	}
	byGroup := map[*config.ModelGroup][]int{}
	for i, w := range ws {
		byGroup[w.Group] = append(byGroup[w.Group], i)
	}
	type batch struct {
		idx []int
		cmd *redis.IntSliceCmd
	}
	var batches []batch
	run := func() error {
		batches = batches[:0]
		pipe := s.rdb.Pipeline()
		for g, list := range byGroup {
			for len(list) > 0 {
				n := min(len(list), placesBatch)
				in := placesIn{Now: s.now(), Group: g, Members: make([]string, n)}
				for k, i := range list[:n] {
					in.Members[k] = ws[i].Member
				}
				// EVALSHA as placesScript.EvalSha sends it, read as integers
				// (not a reply of boxed values: 1,024 numbers a batch).
				keys, args := in.call()
				cmdArgs := make([]any, 0, 3+len(keys)+len(args))
				cmdArgs = append(cmdArgs, "evalsha", placesScript.Hash(), len(keys))
				for _, k := range keys {
					cmdArgs = append(cmdArgs, k)
				}
				cmd := redis.NewIntSliceCmd(ctx, append(cmdArgs, args...)...)
				cmd.SetFirstKeyPos(3)
				_ = pipe.Process(ctx, cmd)
				batches = append(batches, batch{idx: list[:n], cmd: cmd})
				list = list[n:]
			}
		}
		_, err := pipe.Exec(ctx)
		return err
	}
	err := run()
	if err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
		// First use, or Redis restarted and lost its script cache.
		if err = placesScript.Load(ctx, s.rdb).Err(); err == nil {
			err = run()
		}
	}
	if err != nil {
		return nil, fmt.Errorf("scheduler: places: %w", err)
	}
	for _, b := range batches {
		res, err := b.cmd.Result()
		if err == nil {
			var places []Place
			if places, err = placesReply(res, len(b.idx)); err == nil {
				for k, i := range b.idx {
					out[i] = places[k]
				}
				continue
			}
		}
		return nil, fmt.Errorf("scheduler: places: %w", err)
	}
	return out, nil
}

// placesBatch is how many jobs one places script call reads: small enough
// that one call holds Redis for about a millisecond.
const placesBatch = 512

// Expiring lists jobs that passed their deadline while queued: the dispatch
// script took them out of the queue; the caller expires them and calls
// Expired.
func (s *Scheduler) Expiring(ctx context.Context, group string) ([]string, error) {
	return s.rdb.ZRange(ctx, keys{group}.expiring(), 0, 99).Result()
}

// Expired forgets an expiring job once it is expired.
func (s *Scheduler) Expired(ctx context.Context, group, id string) error {
	return s.rdb.ZRem(ctx, keys{group}.expiring(), id).Err()
}

// awayAfter is the gap between two dispatch rounds of a group that means
// every dispatcher, or Redis, was away (a dispatcher runs a round at least
// every five seconds): leases then get a fresh lease time, since their
// holders could not renew them meanwhile.
const awayAfter = 7 * time.Second

// Renew is a worker's heartbeat on the lease of its job's dispatch; false
// means the lease was taken back (the job was queued again and may run
// elsewhere): stop. A lease lost with its key (the job still at this
// dispatch and out of line) is granted again.
func (s *Scheduler) Renew(ctx context.Context, group, id string, dispatch int) (bool, error) {
	n, err := runInt(ctx, s.rdb, renewScript, renewIn{Now: s.now(), Group: group, JobID: id, Lease: s.lease.Milliseconds(), Dispatch: dispatch})
	if err != nil {
		return false, fmt.Errorf("scheduler: renew %s: %w", id, err)
	}
	return n == 1, nil
}

// Pushback is the upstream telling the group to slow down.
type Pushback string

const (
	Pushback429  Pushback = "429"  // rate limited: freeze until retry-after
	PushbackRamp Pushback = "ramp" // ramp_limit_exceeded: freeze and slow
	Pushback529  Pushback = "529"  // overloaded: a burst slows the group
)

// Freeze applies upstream pushback to the whole group, fleet-wide, and
// returns until when the group is frozen.
func (s *Scheduler) Freeze(ctx context.Context, g *config.ModelGroup, kind Pushback, retryAfter time.Duration) (time.Time, error) {
	ms, err := runInt(ctx, s.rdb, freezeScript, freezeIn{Now: s.now(), Group: g, Kind: kind, RetryAfter: retryAfter.Milliseconds()})
	if err != nil {
		return time.Time{}, fmt.Errorf("scheduler: freeze %s: %w", g.Name, err)
	}
	return time.UnixMilli(ms), nil
}

// Observe feeds a response's anthropic-ratelimit-* headers to the limiter:
// it adopts a lower announced limit and never runs ahead of what the
// upstream says remains. answered says the upstream answered (the call
// began, or the upstream refused the request itself): the group is
// healthy, and an outage ends. It reports whether it ended one.
func (s *Scheduler) Observe(ctx context.Context, g *config.ModelGroup, h http.Header, answered bool) (reopened bool, err error) {
	in := observeIn{Now: s.now(), Group: g, Answered: answered}
	seen := false
	for d, dim := range []struct {
		name   string
		tokens bool
	}{{"requests", false}, {"input-tokens", true}, {"output-tokens", true}} {
		lim := headerInt(h, "anthropic-ratelimit-"+dim.name+"-limit")
		rem := headerInt(h, "anthropic-ratelimit-"+dim.name+"-remaining")
		in.Sent[d] = dimHeaders{Limit: lim, Remaining: rem}
		if rem >= 0 && dim.tokens {
			// Token remainings are rounded to the nearest 1,000.
			rem = max(0, rem-500)
		}
		if lim >= 0 || rem >= 0 {
			seen = true
		}
		in.Lowered[d] = dimHeaders{Limit: lim, Remaining: rem}
	}
	if !seen && !answered {
		return false, nil
	}
	n, err := runInt(ctx, s.rdb, observeScript, in)
	if err != nil {
		return false, fmt.Errorf("scheduler: observe %s: %w", g.Name, err)
	}
	return n == 1, nil
}

func headerInt(h http.Header, name string) int64 {
	if h == nil {
		return -1
	}
	v := h.Get(name)
	if v == "" {
		return -1
	}
	n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	if err != nil || n < 0 {
		return -1
	}
	return n
}

// Levels is a group's limiter state as stored (not brought up to date).
type Levels struct {
	Requests, Input, Output float64
	Reserved                int64 // open reservations
	Leases                  int64 // concurrency leases held
	Frozen                  time.Time
}

// Levels reads a group's limiter state (for tests and metrics).
func (s *Scheduler) Levels(ctx context.Context, group string) (Levels, error) {
	k := keys{group}
	pipe := s.rdb.Pipeline()
	h := pipe.HMGet(ctx, k.lim(), "r", "i", "o", "frozen")
	res := pipe.HLen(ctx, k.reservations())
	ls := pipe.ZCard(ctx, k.leases())
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return Levels{}, err
	}
	f := func(v any) float64 {
		n, _ := strconv.ParseFloat(fmt.Sprint(v), 64)
		return n
	}
	vals := h.Val()
	l := Levels{Requests: f(vals[0]), Input: f(vals[1]), Output: f(vals[2]), Reserved: res.Val(), Leases: ls.Val()}
	if fr := f(vals[3]); fr > 0 {
		l.Frozen = time.UnixMilli(int64(fr))
	}
	return l, nil
}

// QueueLength is how many jobs wait in a group's fair queue.
func (s *Scheduler) QueueLength(ctx context.Context, group string) (int64, error) {
	return s.rdb.ZCard(ctx, keys{group}.order()).Result()
}

// Gauges are a model group's live figures, for metrics and the dashboard.
type Gauges struct {
	Queued int64 // jobs waiting in the fair queue
	// QueuedBackground is how many of them are background jobs.
	QueuedBackground int64
	ActiveUsers      int64 // users with at least one job waiting
	InFlight         int64 // concurrency slots taken (calls running or about to)
	// Dispatched is how many jobs were dispatched over the last 60 s (the
	// current minute and the part of the previous one still in the window).
	Dispatched float64
	// DispatchedBackground is how many of them were background jobs.
	DispatchedBackground float64
	// Dimensions: requests, input tokens, output tokens per minute.
	Dimensions []Dimension
	Frozen     time.Duration // how long dispatch stays frozen (upstream 429); 0 = not
	Pace       float64       // the 529 pace factor: 1 = full speed
	// HeadersSeen is when the upstream's rate-limit headers were last read.
	HeadersSeen time.Time
	// Outage is the group's outage, when it is in one (nil: healthy).
	Outage *Outage
	// Outages counts the outages the group has had.
	Outages int64
	// BatchWaiting: jobs waiting for a Message Batch (a canceled one or
	// one gone to the Messages line counts until the next take drops it);
	// InBatches: jobs in batches being created or processed.
	BatchWaiting, InBatches int64
}

// Outage is a model group's outage: the upstream failed enough calls in a
// row that dispatching stopped, and probes test it.
type Outage struct {
	Since time.Time
	// Probes is how many probes failed so far; Probing says one is in
	// flight; NextProbe is when the next one may go (when none is).
	Probes    int64
	Probing   bool
	NextProbe time.Time
}

// Dimension is one of the limiter's three per-minute limits.
type Dimension struct {
	Name  string  // "requests", "input_tokens", "output_tokens"
	Limit float64 // per minute, as sluice applies it (a lower announced limit wins)
	// Used is what went out over the last 60 s: requests dispatched, input
	// and output tokens as the upstream counted them (settled calls).
	Used float64
	// Headroom is what sluice believes is free now: its bucket's level over
	// its capacity, 0..1 (negative while a job larger than the bucket is
	// paid off).
	Headroom float64
	// Upstream is what the last response's headers said remained of their
	// limit, 0..1; -1 when never seen.
	Upstream float64
	// UpstreamLimit and UpstreamRemaining are those headers as sent; -1
	// when never seen.
	UpstreamLimit, UpstreamRemaining int64
}

// Gauges reads g's live figures in one atomic, read-only step.
func (s *Scheduler) Gauges(ctx context.Context, g *config.ModelGroup) (Gauges, error) {
	r, err := s.runGauges(ctx, gaugesIn{Now: s.now(), Group: g})
	if err != nil {
		return Gauges{}, fmt.Errorf("scheduler: gauges %s: %w", g.Name, err)
	}
	seen := func(name string) int64 {
		if v, ok := r.Seen[name]; ok {
			return v
		}
		return -1
	}
	// The last 60 s: this minute so far and the part of the previous one
	// still inside the window.
	frac := math.Mod(r.Now, 60000) / 60000
	window := func(w [2]float64) float64 { return math.Round(w[0] + w[1]*(1-frac)) }
	out := Gauges{
		InFlight: r.Leases, Queued: r.Queued, ActiveUsers: r.Users,
		Dispatched: window(r.Dispatched), Pace: r.Factor, Outages: r.Outages,
		QueuedBackground: r.QueuedB, DispatchedBackground: window(r.DispatchedB),
		BatchWaiting: r.BatchWait, InBatches: r.InBatches,
	}
	used := []float64{out.Dispatched, window(r.Input), window(r.Output)}
	if r.Frozen > r.Now {
		out.Frozen = time.Duration(r.Frozen-r.Now) * time.Millisecond
	}
	if at := seen("at"); at > 0 {
		out.HeadersSeen = time.UnixMilli(at).UTC()
	}
	if r.Down > 0 {
		out.Outage = &Outage{Since: time.UnixMilli(int64(r.Down)).UTC(), Probes: r.Probes, Probing: r.Probing,
			NextProbe: time.UnixMilli(int64(r.ProbeAt)).UTC()}
	}
	for d, name := range []string{"requests", "input_tokens", "output_tokens"} {
		prefix := name[:1]
		dim := Dimension{Name: name, Limit: r.Limits[d], Used: used[d], Upstream: -1,
			UpstreamLimit: seen(prefix + "l"), UpstreamRemaining: seen(prefix + "r")}
		if r.Caps[d] > 0 {
			dim.Headroom = math.Round(r.Levels[d]/r.Caps[d]*1000) / 1000
		}
		if dim.UpstreamLimit > 0 && dim.UpstreamRemaining >= 0 {
			dim.Upstream = math.Round(float64(dim.UpstreamRemaining)/float64(dim.UpstreamLimit)*1000) / 1000
		}
		out.Dimensions = append(out.Dimensions, dim)
	}
	return out, nil
}
