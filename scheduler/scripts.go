package scheduler

import (
	"context"
	"fmt"
	"strconv"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/redisconn"
)

// The scripts' inputs and replies: for each script an input struct whose
// call method lays out its KEYS and ARGV in the order its header lists
// them, and a struct its reply of name, value pairs decodes into (see
// reply.go). A script whose reply is one number has only its input.

// scriptCall is a script's input: its KEYS and ARGV, in the order its
// header lists them.
type scriptCall interface {
	call() (keys []string, args []any)
}

// runScript runs script with in's keys and arguments (followed by WAIT
// when w is not nil, see redisconn.Waiter; what names the step) and decodes
// its reply of pairs into an Out.
func runScript[Out any](ctx context.Context, rdb redis.UniversalClient, w *redisconn.Waiter, what string, script *redis.Script, in scriptCall) (Out, error) {
	var out Out
	keys, args := in.call()
	res, err := w.Run(ctx, rdb, what, script, keys, args...).Result()
	if err != nil {
		return out, err
	}
	err = decodeReply(res, &out)
	return out, err
}

// runInt runs a script whose reply is one integer.
func runInt(ctx context.Context, rdb redis.UniversalClient, script *redis.Script, in scriptCall) (int64, error) {
	keys, args := in.call()
	return script.Run(ctx, rdb, keys, args...).Int64()
}

// admitIn is lua/admit.lua's input.
type admitIn struct {
	Now   int64 // 0: Redis TIME
	Group *config.ModelGroup
	Job   *jobs.Job
	// Idempotency is the Idempotency-Key's key (rkeys.NoIdempotency when
	// the request has none), BodyHash its body's hash ("" when none) and
	// IdempotencyTTL its life in seconds.
	Idempotency    string
	BodyHash       string
	IdempotencyTTL int
	TTL            int    // the record's, seconds
	Prefixes       string // the cacheable prefixes (encodePrefixes)
	Input          int    // the input estimate
	Weight         float64
	// HeldRequests and HeldTokens: what lua/quota.lua charged already.
	HeldRequests, HeldTokens int
	// Quotas is "requests per hour,tokens per hour" when admission checks
	// and charges the user's quotas itself ("" when they were charged
	// already, or none apply).
	Quotas        string
	MaxQueued     int
	MaxWait       int64 // ms, 0 = no limit
	Deadline      int64 // ms, 0 = none
	BatchFallback int64 // ms, 0 = not by batch
	Fields        []any // record field, value pairs
}

// admitCall is one call of lua/admit.lua: the admissions of one group, in
// order (at least one). The group's settings, the record TTL and the
// idempotency TTL come from the first.
type admitCall []admitIn

func (b admitCall) call() ([]string, []any) {
	first := b[0]
	g, k := first.Group, keys{first.Group.Name}
	ks := make([]string, 0, 15+6*len(b))
	ks = append(ks, k.cache(), k.seq(), k.order(), k.finish(), k.vtime(), k.costs(), k.totals(), k.lim(),
		k.deadlines(), jobs.WaitingUsersKey(g.Name), k.live(), k.vtimeB(), k.delayed(), k.delayedTags(), k.batchLine())
	args := make([]any, 0, 9+(17+len(first.Fields))*len(b))
	args = append(args, first.TTL, wakeChannel(g.Name))
	args = append(args, limits(g)...)
	args = append(args, g.MaxConcurrency, countReads(g), first.IdempotencyTTL)
	for _, in := range b {
		j := in.Job
		ks = append(ks, jobs.Key(j.ID), in.Idempotency, jobs.CountsKey(g.Name, j.Tenant, j.UserID),
			jobs.IndexKey(g.Name, j.Tenant, ""), jobs.IndexKey(g.Name, j.Tenant, j.UserID))
		if in.Quotas != "" {
			ks = append(ks, quotaKey(j.Tenant, j.UserID))
		}
		args = append(args, in.Now, j.ID, in.Prefixes, UserKey(j.Tenant, j.UserID), in.Input, j.MaxTokens, in.Weight,
			in.HeldRequests, in.HeldTokens, in.MaxQueued, in.MaxWait, in.BodyHash, in.Deadline, in.Quotas,
			j.Class, in.BatchFallback, len(in.Fields))
		args = append(args, in.Fields...)
	}
	return ks, args
}

// admitOut is lua/admit.lua's reply.
type admitOut struct {
	Outcome Outcome `redis:"outcome"`
	// Admitted.
	Event          string `redis:"event"`
	Position       int    `redis:"position"`
	ETA            int    `redis:"eta"` // seconds; also Overloaded's
	QuotaRemaining int    `redis:"quota_remaining"`
	QuotaReset     int    `redis:"quota_reset"`
	// CreatedAt is the admission's moment on Redis's clock (ms), which
	// the record keeps as created_at; 0 when the caller gave the time.
	CreatedAt int64 `redis:"created_at"`
	// OverQuota (with Limit and Remaining) and Unavailable (with Down).
	Which   string `redis:"which"`
	RetryMS int64  `redis:"retry_ms"`
	// OverQuota: the hourly figure and the bucket's level; QueueLimit:
	// the cap (with Queued).
	Limit     int `redis:"limit"`
	Remaining int `redis:"remaining"`
	Queued    int `redis:"queued"`
	// Replay.
	ReplayOf string `redis:"job"`
	// Overloaded.
	MaxWait int `redis:"max_wait"`
	// Unavailable.
	DownMS int64 `redis:"down_ms"`
}

// runAdmitCall runs lua/admit.lua once for the admissions in b, and
// decodes its reply: one admitOut for each, in order.
func (s *Scheduler) runAdmitCall(ctx context.Context, b admitCall) ([]admitOut, error) {
	keys, args := b.call()
	res, err := s.wait.Run(ctx, s.rdb, "admit", admitScript, keys, args...).Result()
	if err != nil {
		return nil, err
	}
	list, ok := res.([]any)
	if !ok || len(list) != len(b) {
		return nil, fmt.Errorf("scheduler: admit: a reply of %T for %d admissions", res, len(b))
	}
	outs := make([]admitOut, len(b))
	for i, r := range list {
		if err := decodeReply(r, &outs[i]); err != nil {
			return nil, err
		}
	}
	return outs, nil
}

// quotaTakeIn is lua/quota.lua's take: a job's charge to its user's
// quotas, before its admission.
type quotaTakeIn struct {
	Now                            int64
	Job                            *jobs.Job
	RequestsPerHour, TokensPerHour int
	Tokens                         int // to reserve (the request is 1)
}

func (in quotaTakeIn) call() ([]string, []any) {
	j := in.Job
	return []string{quotaKey(j.Tenant, j.UserID), rkeys.QuotaGiven(j.Tenant, j.UserID, j.ID)},
		[]any{in.Now, "take", in.RequestsPerHour, in.TokensPerHour, in.Tokens}
}

// quotaTakeOut is lua/quota.lua's reply to a take.
type quotaTakeOut struct {
	Outcome Outcome `redis:"outcome"` // Admitted or OverQuota
	// Admitted: the requests remaining (-1: unlimited), and the seconds
	// until the request quota is full.
	QuotaRemaining int `redis:"quota_remaining"`
	QuotaReset     int `redis:"quota_reset"`
	// OverQuota.
	Which     string `redis:"which"`
	RetryMS   int64  `redis:"retry_ms"`
	Limit     int    `redis:"limit"`
	Remaining int    `redis:"remaining"`
}

func (s *Scheduler) runQuotaTake(ctx context.Context, in quotaTakeIn) (quotaTakeOut, error) {
	return runScript[quotaTakeOut](ctx, s.rdb, nil, "quota", quotaScript, in)
}

// quotaGiveIn is lua/quota.lua's give: what a job's hold did not use goes
// back to its user's quotas, once. Its reply is 1, or 0 when it was given
// already.
type quotaGiveIn struct {
	Now                            int64
	Job                            *jobs.Job
	RequestsPerHour, TokensPerHour int
	HeldRequests, HeldTokens       int
	UsedRequests, UsedTokens       int
}

func (in quotaGiveIn) call() ([]string, []any) {
	j := in.Job
	return []string{quotaKey(j.Tenant, j.UserID), rkeys.QuotaGiven(j.Tenant, j.UserID, j.ID)},
		[]any{in.Now, "give", in.RequestsPerHour, in.TokensPerHour, in.HeldRequests, in.HeldTokens, in.UsedRequests, in.UsedTokens}
}

// budgetTakeIn is lua/budget.lua's take: a job's worst case reserved in
// one scope's budgets (µ$; a limit of 0 is none).
type budgetTakeIn struct {
	DayKey, MonthKey, Mark string
	DayLimit, MonthLimit   int64
	Amount                 int64
}

func (in budgetTakeIn) call() ([]string, []any) {
	return []string{in.DayKey, in.MonthKey, in.Mark}, []any{"take", in.DayLimit, in.MonthLimit, in.Amount}
}

// budgetTakeOut is lua/budget.lua's reply to a take.
type budgetTakeOut struct {
	Outcome Outcome `redis:"outcome"` // Admitted or OverBudget
	// OverBudget: the period ("day" or "month") whose budget refused, its
	// limit and what was spent and held in it (µ$).
	Period string `redis:"period"`
	Limit  int64  `redis:"limit"`
	Used   int64  `redis:"used"`
}

func (s *Scheduler) runBudgetTake(ctx context.Context, in budgetTakeIn) (budgetTakeOut, error) {
	return runScript[budgetTakeOut](ctx, s.rdb, nil, "budget", budgetScript, in)
}

// budgetGiveIn is lua/budget.lua's give: a hold of Held µ$ in one scope
// settled to Cost, once. Its reply is 1, or 0 when it was settled already.
type budgetGiveIn struct {
	DayKey, MonthKey, Mark string
	Held, Cost             int64
}

func (in budgetGiveIn) call() ([]string, []any) {
	return []string{in.DayKey, in.MonthKey, in.Mark}, []any{"give", 0, 0, in.Held, in.Cost}
}

// cachedIn is lua/cached.lua's input; its reply is the tokens cached.
type cachedIn struct {
	Now      int64
	Group    string
	Prefixes string // encodePrefixes
}

func (in cachedIn) call() ([]string, []any) {
	return []string{keys{in.Group}.cache()}, []any{in.Now, in.Prefixes}
}

// holdOut is a job's hold on its user's quotas and its dollar budgets, as
// lua/prelude.lua's quota_held answers it (in lua/settle.lua's and
// lua/lifecycle.lua's replies).
type holdOut struct {
	Requests int   `redis:"requests"`
	Tokens   int   `redis:"tokens"`
	USD      int64 `redis:"usd"`
	Cost     int64 `redis:"cost"`
	Day      int64 `redis:"day"`
	Month    int64 `redis:"month"`
}

// hold is h as a quotaHold.
func (h holdOut) hold() quotaHold {
	q := quotaHold{requests: h.Requests, tokens: h.Tokens, usd: h.USD, cost: h.Cost}
	if h.Day > 0 {
		q.day, q.month = strconv.FormatInt(h.Day, 10), strconv.FormatInt(h.Month, 10)
	}
	return q
}

// settleIn is lua/settle.lua's input.
type settleIn struct {
	Now      int64
	Group    *config.ModelGroup
	JobID    string
	Used     Used  // what the upstream counted
	Duration int64 // ms of a completed call (0: not measured)
	Final    bool  // the job has ended: take the quota hold too
}

func (in settleIn) call() ([]string, []any) {
	g, k := in.Group, keys{in.Group.Name}
	final := "0"
	if in.Final {
		final = "1"
	}
	args := make([]any, 0, 12)
	args = append(args, in.Now, in.JobID, in.Used.Requests, in.Used.Input, in.Used.Output)
	args = append(args, limits(g)...)
	args = append(args, in.Duration, wakeChannel(g.Name), final)
	return []string{k.lim(), k.reservations(), k.leases(), jobs.Key(in.JobID), k.rate()}, args
}

// settleOut is lua/settle.lua's reply.
type settleOut struct {
	Limiter bool    `redis:"limiter"` // the limiter reservation was settled
	Quota   bool    `redis:"quota"`   // the quota hold was taken (Hold)
	Hold    holdOut `redis:"hold"`
}

func (s *Scheduler) runSettle(ctx context.Context, in settleIn) (settleOut, error) {
	return runScript[settleOut](ctx, s.rdb, nil, "settle", settleScript, in)
}

// dispatchIn is lua/dispatch.lua's input.
type dispatchIn struct {
	Now       int64
	Group     *config.ModelGroup
	Lease     int64 // ms
	Max       int   // most jobs to pick
	MaxEvents int   // a job's event log's length
	Away      int64 // ms: a longer gap between two rounds means the dispatchers were away
}

func (in dispatchIn) call() ([]string, []any) {
	g, k := in.Group, keys{in.Group.Name}
	args := make([]any, 0, 18)
	args = append(args, in.Now)
	args = append(args, limits(g)...)
	args = append(args, g.MaxConcurrency, in.Lease, in.Max, rkeys.Prefix, MovedChannel(g.Name),
		jobs.ChannelPrefix, in.MaxEvents, in.Away, rkeys.UserPrefix(g.Name), outputAccounting(g),
		g.CacheHold.Milliseconds(), countReads(g), g.BackgroundMinShare)
	return []string{
		k.order(), k.delayed(), k.vtime(), k.finish(), k.costs(), k.totals(), k.lim(),
		k.reservations(), k.leases(), k.dispatching(), k.delayedTags(), k.deadlines(), k.expiring(), k.dispatchSeq(),
		k.rate(), k.live(), jobs.WaitingUsersKey(g.Name), k.cache(), k.vtimeB(), k.batched(),
	}, args
}

// dispatchOut is lua/dispatch.lua's reply.
type dispatchOut struct {
	State      State    `redis:"state"`
	WaitMS     int64    `redis:"wait_ms"`
	Expiring   int      `redis:"expiring"`
	Jobs       []Picked `redis:"jobs"`
	ProbeModel string   `redis:"probe_model"`
}

func (s *Scheduler) runDispatch(ctx context.Context, in dispatchIn) (dispatchOut, error) {
	return runScript[dispatchOut](ctx, s.rdb, nil, "dispatch", dispatchScript, in)
}

// positionIn is lua/position.lua's input.
type positionIn struct {
	Now    int64
	Group  *config.ModelGroup
	Member string // the job's queue member
}

func (in positionIn) call() ([]string, []any) {
	g, k := in.Group, keys{in.Group.Name}
	args := make([]any, 0, 7)
	args = append(args, in.Now, in.Member)
	args = append(args, limits(g)...)
	args = append(args, g.MaxConcurrency)
	return []string{k.order(), k.totals(), k.lim()}, args
}

// positionOut is lua/position.lua's reply.
type positionOut struct {
	Position int `redis:"position"` // 0: not in the queue
	ETA      int `redis:"eta"`      // seconds
}

func (s *Scheduler) runPosition(ctx context.Context, in positionIn) (positionOut, error) {
	return runScript[positionOut](ctx, s.rdb, nil, "position", positionScript, in)
}

// placesIn is lua/places.lua's input: a batch of one group's jobs.
type placesIn struct {
	Now     int64
	Group   *config.ModelGroup
	Members []string // the jobs' queue members
}

func (in placesIn) call() ([]string, []any) {
	g, k := in.Group, keys{in.Group.Name}
	args := make([]any, 0, 6+len(in.Members))
	args = append(args, in.Now)
	args = append(args, limits(g)...)
	args = append(args, g.MaxConcurrency)
	for _, m := range in.Members {
		args = append(args, m)
	}
	return []string{k.order(), k.totals(), k.lim()}, args
}

// placesReply reads lua/places.lua's reply for n members: the one script
// whose reply is not name, value pairs but a position and an eta per
// member, all integers, so that it is read without boxing each number
// (redis.IntSliceCmd): a batch holds 1,024 of them, and an api process
// reads every follower's place after each move.
func placesReply(res []int64, n int) ([]Place, error) {
	if len(res) != 2*n {
		return nil, fmt.Errorf("%d answers for %d jobs", len(res), n)
	}
	out := make([]Place, n)
	for k := range out {
		out[k] = Place{Position: int(res[2*k]), ETASeconds: int(res[2*k+1])}
	}
	return out, nil
}

// gaugesIn is lua/gauges.lua's input.
type gaugesIn struct {
	Now   int64
	Group *config.ModelGroup
}

func (in gaugesIn) call() ([]string, []any) {
	g, k := in.Group, keys{in.Group.Name}
	return []string{k.lim(), k.leases(), k.order(), jobs.WaitingUsersKey(g.Name), k.seen(), k.rate(),
		k.batchLine(), k.batched()}, append([]any{in.Now}, limits(g)...)
}

// gaugesOut is lua/gauges.lua's reply. Per-minute use comes as this
// minute's and the previous one's.
type gaugesOut struct {
	Now         float64    `redis:"now"`
	Levels      [3]float64 `redis:"levels"` // requests, input, output
	Caps        [3]float64 `redis:"caps"`
	Limits      [3]float64 `redis:"limits"`
	Frozen      float64    `redis:"frozen"`
	Factor      float64    `redis:"factor"`
	Leases      int64      `redis:"leases"`
	Queued      int64      `redis:"queued"`
	Users       int64      `redis:"users"`
	Dispatched  [2]float64 `redis:"dispatched"`
	DispatchedB [2]float64 `redis:"dispatched_b"`
	QueuedB     int64      `redis:"queued_b"`
	BatchWait   int64      `redis:"batch_waiting"`
	InBatches   int64      `redis:"in_batches"`
	Input       [2]float64 `redis:"input"`
	Output      [2]float64 `redis:"output"`
	Down        float64    `redis:"down"`
	ProbeAt     float64    `redis:"probe_at"`
	Probes      int64      `redis:"probes"`
	Outages     int64      `redis:"outages"`
	Probing     bool       `redis:"probing"`
	// Seen is the last rate-limit headers seen (rl, rr, il, ir, ol, or:
	// limit and remaining per dimension; at: when); one never seen is
	// absent.
	Seen map[string]int64 `redis:"seen"`
}

func (s *Scheduler) runGauges(ctx context.Context, in gaugesIn) (gaugesOut, error) {
	return runScript[gaugesOut](ctx, s.rdb, nil, "gauges", gaugesScript, in)
}

// freezeIn is lua/freeze.lua's input; its reply is the time (ms) until
// which the group is frozen.
type freezeIn struct {
	Now        int64
	Group      *config.ModelGroup
	Kind       Pushback
	RetryAfter int64 // ms
}

func (in freezeIn) call() ([]string, []any) {
	return []string{keys{in.Group.Name}.lim()}, append([]any{in.Now, string(in.Kind), in.RetryAfter}, limits(in.Group)...)
}

// observeIn is lua/observe.lua's input; its reply is 1 when the answer
// ended an outage, else 0.
type observeIn struct {
	Now   int64
	Group *config.ModelGroup
	// Limit and Remaining per dimension (requests, input tokens, output
	// tokens), -1 where a header was absent: Lowered has the token
	// remainings lowered by the upstream's rounding, Sent as sent.
	Lowered, Sent [3]dimHeaders
	Answered      bool // the upstream answered
}

// dimHeaders are one dimension's rate-limit headers.
type dimHeaders struct{ Limit, Remaining int64 }

func (in observeIn) call() ([]string, []any) {
	g, k := in.Group, keys{in.Group.Name}
	args := make([]any, 0, 20)
	args = append(args, in.Now)
	args = append(args, limits(g)...)
	for _, d := range in.Lowered {
		args = append(args, d.Limit, d.Remaining)
	}
	for _, d := range in.Sent {
		args = append(args, d.Limit, d.Remaining)
	}
	ok := "0"
	if in.Answered {
		ok = "1"
	}
	args = append(args, ok, wakeChannel(g.Name), MovedChannel(g.Name))
	return []string{k.lim(), k.seen()}, args
}

// renewIn is lua/renew.lua's input; its reply is 1 when the lease is held
// and extended, 0 when it was taken back.
type renewIn struct {
	Now      int64
	Group    string
	JobID    string
	Lease    int64 // ms
	Dispatch int   // the holder's
}

func (in renewIn) call() ([]string, []any) {
	k := keys{in.Group}
	return []string{k.leases(), jobs.Key(in.JobID), k.order(), k.delayed(), k.expiring()},
		[]any{in.Now, in.JobID, in.Lease, in.Dispatch}
}

// probeIn is lua/probe.lua's input; its reply is 1 when the probe was the
// group's current one, else 0.
type probeIn struct {
	Now    int64
	Group  string
	Health []byte // the outage rule, JSON
}

func (in probeIn) call() ([]string, []any) {
	return []string{keys{in.Group}.lim()}, []any{in.Now, string(in.Health)}
}
