package redisguard_test

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/redisguard"
)

// debugLogger logs everything to logs, as text.
func debugLogger(logs *harness.SyncBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func configSet(t *testing.T, c *redis.Client, key, value string) {
	t.Helper()
	if err := c.ConfigSet(context.Background(), key, value).Err(); err != nil {
		t.Fatalf("CONFIG SET %s %s: %v", key, value, err)
	}
}

func TestCheckNoEviction(t *testing.T) {
	c := redistest.Start(t).Client(t)
	ctx := context.Background()
	p, err := redisguard.Policy(ctx, c)
	if err != nil || p != "noeviction" {
		t.Fatalf("Policy = %q, %v; want noeviction", p, err)
	}
	st, err := redisguard.Check(ctx, c, false)
	if err != nil {
		t.Fatalf("Check on a noeviction Redis: %v", err)
	}
	if !st.OK || st.Evicting() || !st.Known() || st.Allowed || st.Err != "" || st.CheckedAt.IsZero() {
		t.Errorf("status %+v: want OK, known, not evicting, no error", st)
	}
	if st.UsedMemory <= 0 || st.MaxMemory != 0 {
		t.Errorf("memory used %d, max %d: want some used and no limit", st.UsedMemory, st.MaxMemory)
	}
}

// The refusal says what the policy is, why sluice refuses, how to fix it
// and how to override.
func TestCheckRefusesEvictingRedis(t *testing.T) {
	c := redistest.StartArgs(t, "--maxmemory-policy", "allkeys-lru").Client(t)
	st, err := redisguard.Check(context.Background(), c, false)
	if err == nil {
		t.Fatal("Check accepted an allkeys-lru Redis")
	}
	var ee *redisguard.EvictingError
	if !errors.As(err, &ee) || ee.Policy != "allkeys-lru" {
		t.Errorf("error %T %v: want an *EvictingError for allkeys-lru", err, err)
	}
	for _, want := range []string{
		`"allkeys-lru"`, "refuses to start",
		"accepted jobs, queues and limiter state", "a lost key can stop dispatch",
		"CONFIG SET maxmemory-policy noeviction", "maxmemory-policy noeviction in redis.conf", "parameter group",
		"--allow-evicting-redis", "SLUICE_ALLOW_EVICTING_REDIS=true", "redis.allow_evicting: true",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the refusal does not say %q:\n%v", want, err)
		}
	}
	if st.OK || !st.Evicting() || st.Policy != "allkeys-lru" {
		t.Errorf("status %+v: want policy allkeys-lru, evicting", st)
	}
	if p := st.Problem(); !strings.Contains(p, "allkeys-lru") || !strings.Contains(p, "noeviction") {
		t.Errorf("Problem() = %q", p)
	}
}

func TestCheckOverrideAllows(t *testing.T) {
	c := redistest.StartArgs(t, "--maxmemory-policy", "volatile-ttl").Client(t)
	st, err := redisguard.Check(context.Background(), c, true)
	if err != nil {
		t.Fatalf("Check with the override: %v", err)
	}
	if !st.Allowed || st.OK || !st.Evicting() || st.Policy != "volatile-ttl" {
		t.Errorf("status %+v: want allowed, not OK, evicting, volatile-ttl", st)
	}
}

// Managed Redis services disable or rename CONFIG: the policy comes from
// INFO memory instead.
func TestPolicyFromInfoWhenConfigIsDisabled(t *testing.T) {
	c := redistest.StartArgs(t, "--rename-command", "CONFIG", "", "--maxmemory-policy", "allkeys-lfu", "--maxmemory", "64mb").Client(t)
	ctx := context.Background()
	if err := c.ConfigGet(ctx, "maxmemory-policy").Err(); err == nil {
		t.Fatal("CONFIG still works: the test's Redis did not disable it")
	}
	p, err := redisguard.Policy(ctx, c)
	if err != nil || p != "allkeys-lfu" {
		t.Fatalf("Policy = %q, %v; want allkeys-lfu from INFO memory", p, err)
	}
	used, max, err := redisguard.Memory(ctx, c)
	if err != nil || used <= 0 || max != 64<<20 {
		t.Errorf("Memory = %d, %d, %v; want some used of 64 MiB", used, max, err)
	}
	if _, err := redisguard.Check(ctx, c, false); err == nil || !strings.Contains(err.Error(), "allkeys-lfu") {
		t.Errorf("Check = %v; want a refusal naming allkeys-lfu", err)
	}
}

// A Redis that tells neither (miniredis here) is not refused: the caller
// warns.
func TestPolicyUnreadable(t *testing.T) {
	m := miniredis.RunT(t)
	c := redis.NewClient(&redis.Options{Addr: m.Addr()})
	t.Cleanup(func() { _ = c.Close() })
	ctx := context.Background()
	p, err := redisguard.Policy(ctx, c)
	if p != "" || !errors.Is(err, redisguard.ErrPolicyUnknown) {
		t.Fatalf("Policy = %q, %v; want \"\" and ErrPolicyUnknown", p, err)
	}
	st, err := redisguard.Check(ctx, c, false)
	if err != nil {
		t.Fatalf("Check refused a Redis whose policy cannot be read: %v", err)
	}
	if st.Known() || st.Evicting() || st.OK || st.Err == "" {
		t.Errorf("status %+v: want unknown, not evicting, not OK, with the error", st)
	}

	var logs harness.SyncBuffer
	g := redisguard.New(c, config.Redis{}, debugLogger(&logs))
	if _, err := g.Check(ctx); err != nil {
		t.Fatalf("Guard.Check refused: %v", err)
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "cannot read Redis's maxmemory-policy") {
		t.Errorf("no warning about the unreadable policy:\n%s", logs.String())
	}

	// A Redis out of reach is not "unknown": the error is Redis's.
	m.Close()
	if _, err := redisguard.Policy(ctx, c); err == nil || errors.Is(err, redisguard.ErrPolicyUnknown) {
		t.Errorf("Policy of a stopped Redis = %v; want a connection error, not ErrPolicyUnknown", err)
	}
}

// The guard follows the policy while it runs, logs each change once, and
// reports it in its Status and its gauges.
func TestGuardRechecksPolicy(t *testing.T) {
	c := redistest.Start(t).Client(t)
	var logs harness.SyncBuffer
	g := redisguard.New(c, config.Redis{CheckInterval: 50 * time.Millisecond, Timeout: time.Second}, debugLogger(&logs))
	if st := g.Status(); !st.CheckedAt.IsZero() {
		t.Fatalf("status before any check: %+v", st)
	}
	if _, err := g.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	g.Start(context.Background())
	defer g.Stop()
	if !g.Status().OK {
		t.Fatalf("status %+v: want OK", g.Status())
	}
	checkGauge(t, g, "sluice_redis_eviction_policy_ok", 1)

	configSet(t, c, "maxmemory-policy", "allkeys-lru")
	harness.Eventually(t, 5*time.Second, func() bool { st := g.Status(); return st.Policy == "allkeys-lru" && st.Evicting() }, "the guard to see allkeys-lru")
	checkGauge(t, g, "sluice_redis_eviction_policy_ok", 0)
	// A few more checks must not repeat the warning.
	seen := g.Status().CheckedAt
	harness.Eventually(t, 5*time.Second, func() bool { return g.Status().CheckedAt.After(seen.Add(120 * time.Millisecond)) }, "more checks")
	if n := strings.Count(logs.String(), "REDIS EVICTS KEYS"); n != 1 {
		t.Errorf("the evicting policy was logged %d times, want once:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "maxmemory_policy=allkeys-lru") {
		t.Errorf("the warning does not name the policy:\n%s", logs.String())
	}

	configSet(t, c, "maxmemory-policy", "noeviction")
	harness.Eventually(t, 5*time.Second, func() bool { st := g.Status(); return st.OK && !st.Evicting() }, "the guard to see noeviction again")
	harness.Eventually(t, 5*time.Second, func() bool { return strings.Contains(logs.String(), "noeviction again") }, "the recovery to be logged")
	checkGauge(t, g, "sluice_redis_eviction_policy_ok", 1)

	g.Stop()
	g.Stop() // twice is fine
	stopped := g.Status().CheckedAt
	configSet(t, c, "maxmemory-policy", "allkeys-random")
	if st := g.Status(); st.CheckedAt != stopped || st.Policy != "noeviction" {
		t.Errorf("a stopped guard still checks: %+v", st)
	}
}

// Memory at 80% of maxmemory is warned about once per crossing.
func TestGuardWarnsOnMemory(t *testing.T) {
	c := redistest.Start(t).Client(t)
	var logs harness.SyncBuffer
	g := redisguard.New(c, config.Redis{CheckInterval: 50 * time.Millisecond, Timeout: time.Second}, debugLogger(&logs))
	ctx := context.Background()
	used, max, err := redisguard.Memory(ctx, c)
	if err != nil || used <= 0 || max != 0 {
		t.Fatalf("Memory = %d, %d, %v", used, max, err)
	}
	if _, err := g.Check(ctx); err != nil {
		t.Fatal(err)
	}
	checkGauge(t, g, "sluice_redis_maxmemory_bytes", 0)
	g.Start(ctx)
	defer g.Stop()

	limit := used * 11 / 10 // used is about 91% of it
	configSet(t, c, "maxmemory", strconv.FormatInt(limit, 10))
	harness.Eventually(t, 5*time.Second, func() bool { st := g.Status(); return st.MaxMemory == limit && st.MemoryHigh() }, "the guard to see the limit")
	seen := g.Status().CheckedAt
	harness.Eventually(t, 5*time.Second, func() bool { return g.Status().CheckedAt.After(seen.Add(120 * time.Millisecond)) }, "more checks")
	if n := strings.Count(logs.String(), "of maxmemory: when it is full"); n != 1 {
		t.Errorf("high memory was logged %d times, want once:\n%s", n, logs.String())
	}
	checkGauge(t, g, "sluice_redis_maxmemory_bytes", float64(limit))
	if v := gauge(t, g, "sluice_redis_used_memory_bytes"); v <= 0 {
		t.Errorf("sluice_redis_used_memory_bytes = %v", v)
	}

	configSet(t, c, "maxmemory", "0")
	harness.Eventually(t, 5*time.Second, func() bool { return strings.Contains(logs.String(), "below 80% of maxmemory again") }, "the fall below to be logged")
	if st := g.Status(); st.MemoryHigh() || st.MaxMemory != 0 {
		t.Errorf("status %+v after removing the limit", st)
	}
}

// gauge gathers the guard's metrics and returns the named gauge's value; it
// fails the test if the gauge is absent.
func gauge(t *testing.T, g *redisguard.Guard, name string) float64 {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(g)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no gauge %s", name)
	return 0
}

func checkGauge(t *testing.T, g *redisguard.Guard, name string, want float64) {
	t.Helper()
	if v := gauge(t, g, name); v != want {
		t.Errorf("%s = %v, want %v", name, v, want)
	}
}

// Without a readable policy the guard reports no policy gauge.
func TestGuardGaugesAbsentWhenUnknown(t *testing.T) {
	m := miniredis.RunT(t)
	c := redis.NewClient(&redis.Options{Addr: m.Addr()})
	t.Cleanup(func() { _ = c.Close() })
	g := redisguard.New(c, config.Redis{}, slog.New(slog.DiscardHandler))
	if _, err := g.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(g)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(mfs) != 0 {
		t.Errorf("gauges for a Redis that tells nothing: %v", mfs)
	}
}
