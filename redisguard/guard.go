// Package redisguard keeps sluice off a Redis that evicts keys.
//
// sluice keeps everything in Redis: accepted jobs, the fair queues, the
// limiter's buckets, the token secret. A Redis whose maxmemory-policy is not
// noeviction deletes keys when its memory fills, so accepted work vanishes
// and a lost key can stop dispatch. Check refuses such a Redis at start-up
// (unless the operator overrides it); a Guard reads the policy and the
// memory use again while sluice runs, for /readyz, /metrics and the
// dashboard, and logs when either turns bad.
//
// Managed Redis services often disable CONFIG; the policy is then read from
// INFO memory. When neither tells (miniredis, some proxies), sluice cannot
// know: it warns and goes on.
package redisguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
)

// NoEviction is the only maxmemory-policy sluice accepts without an override.
const NoEviction = "noeviction"

// MemoryWarnRatio is the share of maxmemory above which the Guard warns.
const MemoryWarnRatio = 0.8

// ErrPolicyUnknown means Redis answered but would not tell its
// maxmemory-policy: CONFIG is disabled or unknown and INFO memory has no
// maxmemory_policy line. Policy wraps it; test with errors.Is.
var ErrPolicyUnknown = errors.New("the Redis maxmemory-policy cannot be read")

// Policy returns Redis's maxmemory-policy: CONFIG GET maxmemory-policy, or,
// where CONFIG is disabled or renamed (managed Redis) or answers nothing,
// the maxmemory_policy line of INFO memory. If Redis answers both without
// telling, the error wraps ErrPolicyUnknown; any other error (Redis away, ctx
// done) is returned as it is.
//
// In Redis Cluster every primary holds part of sluice's keys: the policy
// is each primary's, and the first that is not noeviction is the answer.
func Policy(ctx context.Context, rdb redis.UniversalClient) (string, error) {
	cc, ok := rdb.(*redis.ClusterClient)
	if !ok {
		return policy(ctx, rdb)
	}
	var mu sync.Mutex
	worst := ""
	err := cc.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error {
		p, err := policy(ctx, node)
		if err != nil {
			return fmt.Errorf("%s: %w", node.Options().Addr, err)
		}
		mu.Lock()
		defer mu.Unlock()
		if worst == "" || worst == "noeviction" {
			worst = p
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return worst, nil
}

func policy(ctx context.Context, rdb redis.UniversalClient) (string, error) {
	m, cfgErr := rdb.ConfigGet(ctx, "maxmemory-policy").Result()
	if cfgErr == nil {
		if p := strings.TrimSpace(m["maxmemory-policy"]); p != "" {
			return strings.ToLower(p), nil
		}
		cfgErr = errors.New("CONFIG GET maxmemory-policy: no value")
	} else if !isReply(cfgErr) {
		return "", fmt.Errorf("CONFIG GET maxmemory-policy: %w", cfgErr)
	} else {
		cfgErr = fmt.Errorf("CONFIG GET maxmemory-policy: %w", cfgErr)
	}
	info, infoErr := rdb.Info(ctx, "memory").Result()
	if infoErr != nil {
		if !isReply(infoErr) {
			return "", fmt.Errorf("INFO memory: %w", infoErr)
		}
		return "", fmt.Errorf("%w (%v; INFO memory: %v)", ErrPolicyUnknown, cfgErr, infoErr)
	}
	if p := strings.TrimSpace(infoField(info, "maxmemory_policy")); p != "" {
		return strings.ToLower(p), nil
	}
	return "", fmt.Errorf("%w (%v; INFO memory has no maxmemory_policy)", ErrPolicyUnknown, cfgErr)
}

// isReply tells an error reply of Redis's (unknown command, NOPERM, an
// unsupported INFO section) from a failure to reach it.
func isReply(err error) bool {
	var re redis.Error
	return errors.As(err, &re) && !errors.Is(err, redis.Nil)
}

// Memory returns used_memory and maxmemory (0 = no limit) from INFO memory,
// in bytes. In Redis Cluster it is the primary nearest to its maxmemory
// (a full shard refuses writes whatever the others hold).
func Memory(ctx context.Context, rdb redis.UniversalClient) (used, max int64, err error) {
	cc, ok := rdb.(*redis.ClusterClient)
	if !ok {
		return memory(ctx, rdb)
	}
	var mu sync.Mutex
	worst := -1.0
	err = cc.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error {
		u, m, err := memory(ctx, node)
		if err != nil {
			return fmt.Errorf("%s: %w", node.Options().Addr, err)
		}
		ratio := 0.0
		if m > 0 {
			ratio = float64(u) / float64(m)
		}
		mu.Lock()
		defer mu.Unlock()
		if ratio > worst {
			worst, used, max = ratio, u, m
		}
		return nil
	})
	if err != nil {
		return 0, 0, err
	}
	return used, max, nil
}

func memory(ctx context.Context, rdb redis.UniversalClient) (used, max int64, err error) {
	info, err := rdb.Info(ctx, "memory").Result()
	if err != nil {
		return 0, 0, fmt.Errorf("INFO memory: %w", err)
	}
	read := func(name string) (int64, error) {
		v := infoField(info, name)
		if v == "" {
			return 0, fmt.Errorf("INFO memory has no %s", name)
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("INFO memory: %s: %w", name, err)
		}
		return n, nil
	}
	if used, err = read("used_memory"); err != nil {
		return 0, 0, err
	}
	if max, err = read("maxmemory"); err != nil {
		return 0, 0, err
	}
	return used, max, nil
}

// infoField is the value of one "name:value" line of an INFO answer.
func infoField(info, name string) string {
	for _, line := range strings.Split(info, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if ok && k == name {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// Status is what the last check found.
type Status struct {
	// Policy is Redis's maxmemory-policy; "" when it could not be read.
	Policy string
	// OK: Policy is noeviction.
	OK bool
	// Allowed: the override (redis.allow_evicting) is on.
	Allowed bool
	// UsedMemory and MaxMemory are INFO memory's used_memory and maxmemory
	// in bytes (MaxMemory 0 = no limit); both 0 when INFO memory could not
	// be read.
	UsedMemory, MaxMemory int64
	// CheckedAt is when the check ran; zero before the first.
	CheckedAt time.Time
	// Err is what went wrong reading the policy or the memory; "" if nothing.
	Err string
}

// Known reports whether the policy could be read.
func (s Status) Known() bool { return s.Policy != "" }

// Evicting reports whether Redis is known to evict keys: its policy was
// read and is not noeviction. /readyz fails while it is true, override or
// not.
func (s Status) Evicting() bool { return s.Known() && !s.OK }

// MemoryKnown reports whether INFO memory was read.
func (s Status) MemoryKnown() bool { return s.UsedMemory > 0 }

// MemoryHigh reports whether used memory is at or above MemoryWarnRatio of
// a set maxmemory.
func (s Status) MemoryHigh() bool {
	return s.MaxMemory > 0 && float64(s.UsedMemory) >= MemoryWarnRatio*float64(s.MaxMemory)
}

// Problem says, in one sentence for /readyz and the dashboard, why an
// evicting Redis is a problem; "" when it is not evicting.
func (s Status) Problem() string {
	if !s.Evicting() {
		return ""
	}
	return fmt.Sprintf("Redis's maxmemory-policy is %s: when its memory fills it deletes keys (accepted jobs, queues, limiter state), "+
		"and a lost key can stop dispatch. Set maxmemory-policy noeviction.", s.Policy)
}

// EvictingError is Check's refusal of a Redis that evicts keys.
type EvictingError struct{ Policy string }

func (e *EvictingError) Error() string {
	return fmt.Sprintf(`Redis's maxmemory-policy is %q, not noeviction: sluice refuses to start.
A Redis that evicts deletes keys when its memory fills: accepted jobs, queues and limiter state vanish, and a lost key can stop dispatch.
Fix it on the Redis: CONFIG SET maxmemory-policy noeviction, and maxmemory-policy noeviction in redis.conf so that it survives a restart
(on a managed Redis, set maxmemory-policy to noeviction in its parameter group).
To start anyway, accepting that jobs can be lost: --allow-evicting-redis, env SLUICE_ALLOW_EVICTING_REDIS=true, or redis.allow_evicting: true in the config.`, e.Policy)
}

// Read reads the policy and the memory use once. It never fails: what it
// could not read is in Status.Err.
func Read(ctx context.Context, rdb redis.UniversalClient, allowEvicting bool) Status {
	st, _ := read(ctx, rdb, allowEvicting)
	return st
}

// read is Read, and whether Redis answered the policy question (with the
// policy or without it) rather than being out of reach.
func read(ctx context.Context, rdb redis.UniversalClient, allowEvicting bool) (st Status, answered bool) {
	st = Status{Allowed: allowEvicting, CheckedAt: time.Now()}
	var errs []string
	p, err := Policy(ctx, rdb)
	if err != nil {
		errs = append(errs, "maxmemory-policy: "+err.Error())
	}
	answered = err == nil || errors.Is(err, ErrPolicyUnknown)
	st.Policy, st.OK = p, p == NoEviction
	used, max, err := Memory(ctx, rdb)
	if err != nil {
		errs = append(errs, "memory: "+err.Error())
	}
	st.UsedMemory, st.MaxMemory = used, max
	st.Err = strings.Join(errs, "; ")
	return st, answered
}

// Check is the start-up check. It returns what Read found, and an
// *EvictingError when the policy is known, is not noeviction and
// allowEvicting is off. A policy that cannot be read is no refusal: the
// error is nil and the caller warns (Status.Known is false, Status.Err says
// why); so is an evicting Redis with the override (Status.Evicting).
func Check(ctx context.Context, rdb redis.UniversalClient, allowEvicting bool) (Status, error) {
	st := Read(ctx, rdb, allowEvicting)
	if st.Evicting() && !allowEvicting {
		return st, &EvictingError{Policy: st.Policy}
	}
	return st, nil
}

// Guard reads the policy and memory use every CheckInterval, keeps the last
// Status, logs when they turn bad, and is a prometheus.Collector of the
// gauges sluice_redis_used_memory_bytes, sluice_redis_maxmemory_bytes and
// sluice_redis_eviction_policy_ok.
type Guard struct {
	rdb      redis.UniversalClient
	allow    bool
	interval time.Duration
	timeout  time.Duration
	log      *slog.Logger

	mu     sync.RWMutex
	status Status

	// checkMu serialises checks and guards the logging state below.
	checkMu sync.Mutex
	logged  string // the policy state last logged: a policy, "?" (unreadable), or "" (none yet)
	memHigh bool
	failing bool // the last read could not reach Redis

	runMu  sync.Mutex
	cancel context.CancelFunc
	done   chan struct{}

	usedDesc, maxDesc, okDesc *prometheus.Desc
}

// New returns a Guard for rdb with the settings of cfg (AllowEvicting,
// CheckInterval, Timeout; zero values mean the config defaults). log nil
// means slog.Default().
func New(rdb redis.UniversalClient, cfg config.Redis, log *slog.Logger) *Guard {
	if log == nil {
		log = slog.Default()
	}
	if cfg.CheckInterval <= 0 {
		cfg.CheckInterval = config.DefaultRedisCheck
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = config.DefaultRedisTimeout
	}
	return &Guard{rdb: rdb, allow: cfg.AllowEvicting, interval: cfg.CheckInterval, timeout: cfg.Timeout, log: log,
		usedDesc: prometheus.NewDesc("sluice_redis_used_memory_bytes", "Redis's used_memory (INFO memory), as of the last check.", nil, nil),
		maxDesc:  prometheus.NewDesc("sluice_redis_maxmemory_bytes", "Redis's maxmemory (0 = no limit), as of the last check.", nil, nil),
		okDesc: prometheus.NewDesc("sluice_redis_eviction_policy_ok",
			"1 if Redis's maxmemory-policy is noeviction, 0 if it evicts keys (jobs can be lost); absent when the policy cannot be read.", nil, nil),
	}
}

// Status is the last check's result (zero before the first). Safe for
// concurrent use.
func (g *Guard) Status() Status {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.status
}

// Check runs one check now, keeps its Status and returns it, with an
// *EvictingError if the Redis evicts and the override is off (which it does
// not log: the caller reports it). Otherwise it logs as the periodic checks
// do: a loud warning for an evicting Redis, a warning for an unreadable
// policy or memory over MemoryWarnRatio.
func (g *Guard) Check(ctx context.Context) (Status, error) {
	st := g.check(ctx, true)
	if st.Evicting() && !g.allow {
		return st, &EvictingError{Policy: st.Policy}
	}
	return st, nil
}

// Start re-checks every interval in a goroutine until ctx ends or Stop is
// called. A second Start without Stop does nothing.
func (g *Guard) Start(ctx context.Context) {
	g.runMu.Lock()
	defer g.runMu.Unlock()
	if g.cancel != nil {
		return
	}
	ctx, g.cancel = context.WithCancel(ctx)
	g.done = make(chan struct{})
	go func(done chan struct{}) {
		defer close(done)
		t := time.NewTicker(g.interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				g.check(ctx, false)
			}
		}
	}(g.done)
}

// Stop ends the re-checks and waits for a running one to finish. Safe to
// call more than once, or without Start.
func (g *Guard) Stop() {
	g.runMu.Lock()
	defer g.runMu.Unlock()
	if g.cancel == nil {
		return
	}
	g.cancel()
	<-g.done
	g.cancel, g.done = nil, nil
}

// check reads, keeps and logs. At start-up a refused policy is not logged.
func (g *Guard) check(ctx context.Context, startup bool) Status {
	g.checkMu.Lock()
	defer g.checkMu.Unlock()
	rctx, cancel := context.WithTimeout(ctx, g.timeout)
	st, answered := read(rctx, g.rdb, g.allow)
	cancel()
	if ctx.Err() != nil && !startup {
		return g.Status() // stopping: a canceled read says nothing about Redis
	}
	if prev := g.Status(); !answered && !prev.CheckedAt.IsZero() {
		// Redis was out of reach: keep what was known, with the error
		// (/readyz's ping reports Redis away on its own).
		kept := prev
		kept.CheckedAt, kept.Err = st.CheckedAt, st.Err
		st = kept
		if !g.failing {
			g.failing = true
			g.log.Warn("could not re-check Redis's eviction policy and memory; keeping the last values", "err", st.Err)
		}
	} else {
		if g.failing {
			g.failing = false
			g.log.Info("Redis's eviction policy and memory can be read again")
		}
		if !(startup && st.Evicting() && !g.allow) {
			g.logPolicy(st)
		}
		g.logMemory(st)
	}
	g.mu.Lock()
	g.status = st
	g.mu.Unlock()
	return st
}

// logPolicy logs a change of the policy's state: once when it turns bad or
// unreadable, once when it is noeviction again.
func (g *Guard) logPolicy(st Status) {
	state := st.Policy
	if !st.Known() {
		state = "?"
	}
	if state == g.logged {
		return
	}
	prev := g.logged
	g.logged = state
	switch {
	case st.Evicting():
		why := "the override redis.allow_evicting is on, so sluice keeps running"
		if !g.allow {
			why = "it changed while sluice runs (sluice would not have started on it)"
		}
		g.log.Warn("!!! REDIS EVICTS KEYS: its maxmemory-policy is "+st.Policy+", not noeviction. "+
			"When its memory fills it deletes accepted jobs, queues and limiter state, and a lost key can stop dispatch; "+why+", and /readyz fails. "+
			"Fix: CONFIG SET maxmemory-policy noeviction, and maxmemory-policy noeviction in redis.conf (or the managed Redis's parameter group).",
			"maxmemory_policy", st.Policy, "allow_evicting", g.allow)
	case !st.Known():
		g.log.Warn("cannot read Redis's maxmemory-policy (CONFIG GET and INFO memory do not tell): sluice cannot check that Redis never evicts keys; make sure its maxmemory-policy is noeviction",
			"err", st.Err)
	case prev != "" && prev != "?":
		g.log.Info("Redis's maxmemory-policy is noeviction again", "was", prev)
	default:
		g.log.Debug("Redis's maxmemory-policy is noeviction")
	}
}

// logMemory warns once each time used memory rises to MemoryWarnRatio of
// maxmemory, and notes when it falls below again.
func (g *Guard) logMemory(st Status) {
	if !st.MemoryKnown() {
		return
	}
	high := st.MemoryHigh()
	if high == g.memHigh {
		return
	}
	g.memHigh = high
	pct := 0.0
	if st.MaxMemory > 0 {
		pct = float64(st.UsedMemory) / float64(st.MaxMemory) * 100
	}
	if high {
		then := "writes fail (new jobs are refused)"
		if st.Evicting() {
			then = "it evicts keys (accepted jobs can be lost)"
		}
		g.log.Warn(fmt.Sprintf("Redis memory is %.0f%% of maxmemory: when it is full, %s; raise maxmemory or free memory", pct, then),
			"used_memory_bytes", st.UsedMemory, "maxmemory_bytes", st.MaxMemory)
		return
	}
	g.log.Info(fmt.Sprintf("Redis memory is below %.0f%% of maxmemory again", MemoryWarnRatio*100),
		"used_memory_bytes", st.UsedMemory, "maxmemory_bytes", st.MaxMemory)
}

// Describe implements prometheus.Collector.
func (g *Guard) Describe(ch chan<- *prometheus.Desc) {
	ch <- g.usedDesc
	ch <- g.maxDesc
	ch <- g.okDesc
}

// Collect implements prometheus.Collector with the last check's values
// (it does not call Redis): the memory gauges when INFO memory was read,
// the policy gauge when the policy was.
func (g *Guard) Collect(ch chan<- prometheus.Metric) {
	st := g.Status()
	if st.MemoryKnown() {
		ch <- prometheus.MustNewConstMetric(g.usedDesc, prometheus.GaugeValue, float64(st.UsedMemory))
		ch <- prometheus.MustNewConstMetric(g.maxDesc, prometheus.GaugeValue, float64(st.MaxMemory))
	}
	if st.Known() {
		ok := 0.0
		if st.OK {
			ok = 1
		}
		ch <- prometheus.MustNewConstMetric(g.okDesc, prometheus.GaugeValue, ok)
	}
}
