package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/redisconn"
)

const migrateHelp = `Usage: sluice migrate [flags]

Moves the keys an earlier sluice release wrote (the layout without hash
tags, "sluice:job:…", "sluice:fq:…") to the names this release reads
("sluice:{tag}:…"), so that one Redis can go on serving after an upgrade.
Every process refuses to start on a Redis that still holds the old layout
and says to run this command.

It needs the old release's queue drained: no job queued or running (the
jobs that wait carry ids without their group's tag and cannot be moved),
and no sluice process running against the Redis (asynq's list of servers
must be empty; a process stopped less than a minute ago may still be
listed: try again). Upgrade in this order: stop the api processes (no new
jobs), let the workers finish what is queued, stop them, run
"sluice migrate", start the new release.

What it moves: finished jobs' records and event logs (with their expiry,
so they stay readable by id until they expire as before), the job lists
of tenants and users (split by model group), Idempotency-Keys, the hourly
quota buckets, and each model group's limiter, fair-queue and cache state.
Usage statistics, the token secret and the estimate calibration keep their
names. Running it again after it finished, or on a Redis without the old
layout, changes nothing.

Flags:
` + "%s" + `
Environment: SLUICE_CONFIG, REDIS_URL and REDIS_MODE, as for sluice serve.
`

// runMigrate runs `sluice migrate`.
func runMigrate(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", getenv("SLUICE_CONFIG"), "the YAML configuration file (env SLUICE_CONFIG)")
	dryRun := fs.Bool("dry-run", false, "count what would move; change nothing")
	fs.Usage = func() { fmt.Fprintf(stderr, migrateHelp, flagHelp(fs)) }
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("migrate takes no arguments, got %q", fs.Args())
	}
	cfg, err := config.Load(*configPath, getenv)
	if err != nil {
		return fmt.Errorf("configuration:\n%w", err)
	}
	rdb, err := connectRedis(ctx, cfg, "")
	if err != nil {
		return err
	}
	defer rdb.Close()
	if cfg.Redis.Mode == redisconn.Cluster {
		// No release before the hash-tagged layout ran on Redis Cluster.
		fmt.Fprintln(stdout, "Redis Cluster: earlier releases did not run on it, nothing to migrate.")
		return rdb.Set(ctx, rkeys.Layout, rkeys.LayoutVersion, 0).Err()
	}
	m := &migration{rdb: rdb, dry: *dryRun, out: stdout}
	return m.run(ctx)
}

// The old layout's key families, after "sluice:". Keys of the current
// layout start with "sluice:{"; the usage statistics, the token secret and
// the estimate calibration kept their names.
var legacyFamilies = []string{"job:", "user:", "tenant:", "quota:", "idem:", "fq:", "lim:", "live:", "cache:"}

// legacyFamily is the old family of key ("" when key is not in the old
// layout).
func legacyFamily(key string) string {
	rest, ok := strings.CutPrefix(key, rkeys.Prefix)
	if !ok {
		return ""
	}
	for _, f := range legacyFamilies {
		if strings.HasPrefix(rest, f) {
			return f
		}
	}
	return ""
}

// scanLegacy calls fn with every key of the old layout (SCAN: the keys
// written while it runs may be missed or seen twice).
func scanLegacy(ctx context.Context, rdb redis.UniversalClient, fn func(key string) error) error {
	iter := rdb.Scan(ctx, 0, rkeys.Prefix+"*", 1000).Iterator()
	for iter.Next(ctx) {
		if legacyFamily(iter.Val()) == "" {
			continue
		}
		if err := fn(iter.Val()); err != nil {
			return err
		}
	}
	return iter.Err()
}

// errLegacyFound ends scanLegacy at the first old key.
var errLegacyFound = errors.New("old layout found")

// errLegacyLayout is checkLayout's refusal of the old layout.
var errLegacyLayout = errors.New("this Redis holds data of an earlier sluice release in its old key layout")

// checkLayout refuses a Redis that holds keys of the old layout: this
// release would not see them (queued jobs would never run, finished ones
// would answer 404). A Redis found clean is marked (rkeys.Layout), so the
// keyspace is scanned once, not at every start.
func checkLayout(ctx context.Context, rdb redis.UniversalClient, mode string) error {
	v, err := rdb.Get(ctx, rkeys.Layout).Result()
	if err == nil && v == rkeys.LayoutVersion {
		return nil
	}
	if err != nil && err != redis.Nil {
		return fmt.Errorf("reading the key layout's mark (%s): %w", rkeys.Layout, err)
	}
	if mode != redisconn.Cluster {
		var first string
		err := scanLegacy(ctx, rdb, func(key string) error { first = key; return errLegacyFound })
		if err == errLegacyFound {
			return fmt.Errorf("%w (for example %q), which this release does not read: stop every sluice process of the earlier release once its queued jobs "+
				"have finished, run \"sluice migrate\" once with this configuration, then start this release "+
				"(\"sluice migrate --help\" tells the whole procedure)", errLegacyLayout, first)
		}
		if err != nil {
			return fmt.Errorf("looking for keys of an earlier release: %w", err)
		}
	}
	return rdb.Set(ctx, rkeys.Layout, rkeys.LayoutVersion, 0).Err()
}

// migration moves the old layout's keys to the current names.
type migration struct {
	rdb redis.UniversalClient
	dry bool
	out io.Writer

	moved   map[string]int // by what
	dropped map[string]int
	group   map[string]string // job id → group, "" when its record is gone
}

func (m *migration) run(ctx context.Context) error {
	if err := m.refuseLive(ctx); err != nil {
		return err
	}
	keys := map[string][]string{}
	n := 0
	if err := scanLegacy(ctx, m.rdb, func(k string) error {
		f := legacyFamily(k)
		keys[f] = append(keys[f], k)
		n++
		return nil
	}); err != nil {
		return err
	}
	if n == 0 {
		fmt.Fprintln(m.out, "No keys of the old layout: nothing to migrate.")
		if m.dry {
			return nil
		}
		return m.rdb.Set(ctx, rkeys.Layout, rkeys.LayoutVersion, 0).Err()
	}
	m.moved, m.dropped, m.group = map[string]int{}, map[string]int{}, map[string]string{}
	// Job records first: the indexes and Idempotency-Keys find each job's
	// group in its record.
	steps := []struct {
		family string
		fn     func(context.Context, string) error
	}{
		{"job:", m.job}, {"user:", m.user}, {"tenant:", m.tenant}, {"idem:", m.idem},
		{"quota:", m.quota}, {"fq:", m.engine}, {"lim:", m.engine}, {"cache:", m.engine}, {"live:", m.engine},
	}
	for _, s := range steps {
		sort.Strings(keys[s.family])
		for _, k := range keys[s.family] {
			if err := s.fn(ctx, k); err != nil {
				return fmt.Errorf("migrating %s: %w (nothing is lost: run sluice migrate again)", k, err)
			}
		}
	}
	verb := "Moved"
	if m.dry {
		verb = "Would move"
	}
	fmt.Fprintf(m.out, "%s %s.\n", verb, tally(m.moved))
	if len(m.dropped) > 0 {
		verb = "Dropped"
		if m.dry {
			verb = "Would drop"
		}
		fmt.Fprintf(m.out, "%s %s.\n", verb, tally(m.dropped))
	}
	if m.dry {
		fmt.Fprintln(m.out, "Dry run: nothing was changed.")
		return nil
	}
	return m.rdb.Set(ctx, rkeys.Layout, rkeys.LayoutVersion, 0).Err()
}

// tally is "3 job records, 2 user job lists" in a stable order.
func tally(c map[string]int) string {
	var names []string
	for k := range c {
		names = append(names, k)
	}
	sort.Strings(names)
	var parts []string
	for _, k := range names {
		parts = append(parts, fmt.Sprintf("%d %s", c[k], k))
	}
	return strings.Join(parts, ", ")
}

// refuseLive refuses while a sluice process runs against the Redis or a
// job of the old layout is queued or running.
func (m *migration) refuseLive(ctx context.Context) error {
	servers, err := asynq.NewInspectorFromRedisClient(m.rdb).Servers()
	if err != nil {
		return fmt.Errorf("listing the worker processes on this Redis: %w", err)
	}
	if len(servers) > 0 {
		var who []string
		for _, s := range servers {
			who = append(who, fmt.Sprintf("%s pid %d", s.Host, s.PID))
		}
		return fmt.Errorf("%d sluice worker process(es) still run against this Redis (%s): stop every sluice process "+
			"first (a process stopped less than a minute ago may still be listed: try again then)", len(servers), strings.Join(who, ", "))
	}
	live := map[string]int64{}
	total := int64(0)
	iter := m.rdb.Scan(ctx, 0, rkeys.Prefix+"live:*", 1000).Iterator()
	for iter.Next(ctx) {
		n, err := m.rdb.HLen(ctx, iter.Val()).Result()
		if err != nil {
			return err
		}
		if n > 0 {
			live[strings.TrimPrefix(iter.Val(), rkeys.Prefix+"live:")] = n
			total += n
		}
	}
	if err := iter.Err(); err != nil {
		return err
	}
	if total > 0 {
		var groups []string
		for g, n := range live {
			groups = append(groups, fmt.Sprintf("%s: %d", g, n))
		}
		sort.Strings(groups)
		return fmt.Errorf("%d job(s) of the earlier release are still queued or running (%s): start its workers again "+
			"(not its api) until they finish, or cancel them, then run sluice migrate again; "+
			"nothing was changed", total, strings.Join(groups, ", "))
	}
	return nil
}

// rename moves old to new (keeping its expiry), counted as what.
func (m *migration) rename(ctx context.Context, old, new, what string) error {
	m.moved[what]++
	if m.dry {
		return nil
	}
	err := m.rdb.Rename(ctx, old, new).Err()
	if err != nil && strings.Contains(err.Error(), "no such key") {
		return nil // expired meanwhile
	}
	return err
}

// drop deletes a key the new layout has no use for, counted as what.
func (m *migration) drop(ctx context.Context, key, what string) error {
	m.dropped[what]++
	if m.dry {
		return nil
	}
	return m.rdb.Del(ctx, key).Err()
}

// job moves a job's record and event log; its followers' leases (kept by
// running api processes, which are stopped) are dropped.
func (m *migration) job(ctx context.Context, key string) error {
	rest := strings.TrimPrefix(key, rkeys.Prefix+"job:")
	id, suffix, _ := strings.Cut(rest, ":")
	if len(id) < 4+rkeys.TagLen {
		return m.drop(ctx, key, "unrecognized job keys")
	}
	switch suffix {
	case "":
		return m.rename(ctx, key, rkeys.Job(id), "job records")
	case "events":
		return m.rename(ctx, key, rkeys.JobEvents(id), "job event logs")
	default:
		return m.drop(ctx, key, "job follower leases")
	}
}

// groupOf is the model group of job id, read from its record (moved
// already, or not in a dry run); "" when the record expired.
func (m *migration) groupOf(ctx context.Context, id string) (string, error) {
	if g, ok := m.group[id]; ok {
		return g, nil
	}
	key := rkeys.Job(id)
	if m.dry {
		key = rkeys.Prefix + "job:" + id
	}
	g, err := m.rdb.HGet(ctx, key, "group").Result()
	if err == redis.Nil {
		g, err = "", nil
	}
	if err != nil {
		return "", err
	}
	m.group[id] = g
	return g, nil
}

// user moves a user's job list, split by group; the counts (all zero in a
// drained Redis) are dropped: admission writes them anew.
func (m *migration) user(ctx context.Context, key string) error {
	rest := strings.TrimPrefix(key, rkeys.Prefix+"user:")
	tenant, rest, _ := strings.Cut(rest, ":")
	switch {
	case strings.HasSuffix(rest, ":jobs"):
		user := strings.TrimSuffix(rest, ":jobs")
		return m.index(ctx, key, func(g string) string { return rkeys.UserJobs(g, tenant, user) }, "user job lists")
	case strings.HasSuffix(rest, ":counts"):
		return m.drop(ctx, key, "user job counts")
	}
	return m.drop(ctx, key, "unrecognized user keys")
}

// tenant moves a tenant's job list, split by group.
func (m *migration) tenant(ctx context.Context, key string) error {
	rest := strings.TrimPrefix(key, rkeys.Prefix+"tenant:")
	tenant, ok := strings.CutSuffix(rest, ":jobs")
	if !ok {
		return m.drop(ctx, key, "unrecognized tenant keys")
	}
	return m.index(ctx, key, func(g string) string { return rkeys.TenantJobs(g, tenant) }, "tenant job lists")
}

// index moves a job list (sorted set) into one list per group, keeping
// scores and expiry; ids whose record expired are left out.
func (m *migration) index(ctx context.Context, key string, to func(g string) string, what string) error {
	entries, err := m.rdb.ZRangeWithScores(ctx, key, 0, -1).Result()
	if err != nil {
		return err
	}
	ttl, err := m.rdb.PTTL(ctx, key).Result()
	if err != nil {
		return err
	}
	byGroup := map[string][]redis.Z{}
	for _, e := range entries {
		id, _ := e.Member.(string)
		g, err := m.groupOf(ctx, id)
		if err != nil {
			return err
		}
		if g != "" {
			byGroup[g] = append(byGroup[g], e)
		}
	}
	m.moved[what]++
	if m.dry {
		return nil
	}
	for g, zs := range byGroup {
		dst := to(g)
		p := m.rdb.TxPipeline() // one slot: a transaction is fine in cluster mode too
		p.ZAdd(ctx, dst, zs...)
		if ttl > 0 {
			p.PExpire(ctx, dst, ttl)
		}
		if _, err := p.Exec(ctx); err != nil {
			return err
		}
	}
	return m.rdb.Del(ctx, key).Err()
}

// idem moves an Idempotency-Key into its job's group; a key whose job
// expired is dropped (it would have answered nothing).
func (m *migration) idem(ctx context.Context, key string) error {
	if key == rkeys.Prefix+"idem:none" {
		return m.drop(ctx, key, "placeholder keys")
	}
	// sluice:idem:<tenant>:<len(user)>:<user>:<key>
	rest := strings.TrimPrefix(key, rkeys.Prefix+"idem:")
	tenant, rest, _ := strings.Cut(rest, ":")
	lenStr, rest, _ := strings.Cut(rest, ":")
	var n int
	if _, err := fmt.Sscan(lenStr, &n); err != nil || n < 0 || n+1 > len(rest) || rest[n] != ':' {
		return m.drop(ctx, key, "unrecognized Idempotency-Keys")
	}
	user, ikey := rest[:n], rest[n+1:]
	v, err := m.rdb.Get(ctx, key).Result()
	if err == redis.Nil {
		return nil
	}
	if err != nil {
		return err
	}
	id, _, _ := strings.Cut(v, "|")
	g, err := m.groupOf(ctx, id)
	if err != nil {
		return err
	}
	if g == "" {
		return m.drop(ctx, key, "Idempotency-Keys of expired jobs")
	}
	return m.rename(ctx, key, rkeys.Idempotency(g, tenant, user, ikey), "Idempotency-Keys")
}

// quota moves a user's hourly quota buckets (sluice:quota:<tenant>:<user>).
func (m *migration) quota(ctx context.Context, key string) error {
	rest := strings.TrimPrefix(key, rkeys.Prefix+"quota:")
	tenant, user, ok := strings.Cut(rest, ":")
	if !ok {
		return m.drop(ctx, key, "unrecognized quota keys")
	}
	return m.rename(ctx, key, rkeys.Quota(tenant, user), "quota buckets")
}

// engine moves a group's limiter, fair-queue and cache state: the limiter
// keeps what the last minute spent, so the first minute after the upgrade
// does not send more than the account allows.
func (m *migration) engine(ctx context.Context, key string) error {
	rest := strings.TrimPrefix(key, rkeys.Prefix)
	family, rest, _ := strings.Cut(rest, ":")
	g, name, _ := strings.Cut(rest, ":")
	switch family {
	case "fq":
		return m.rename(ctx, key, rkeys.FQ(g, name), "fair-queue keys")
	case "lim":
		switch name {
		case "":
			return m.rename(ctx, key, rkeys.Limiter(g), "limiter states")
		case "res":
			return m.rename(ctx, key, rkeys.Reservations(g), "limiter keys")
		case "leases":
			return m.rename(ctx, key, rkeys.Leases(g), "limiter keys")
		case "seen":
			return m.rename(ctx, key, rkeys.HeadersSeen(g), "limiter keys")
		}
	case "cache":
		if name == "" {
			return m.rename(ctx, key, rkeys.Cache(g), "prompt-cache states")
		}
	case "live":
		if name == "" {
			return m.drop(ctx, key, "empty live-job sets")
		}
	}
	return m.drop(ctx, key, "unrecognized engine keys")
}
