// Package limiter keeps sluice inside the upstream account's limits,
// fleet-wide: every decision is one Lua script on the shared Redis, with
// Redis TIME as the clock.
package limiter

import (
	"context"
	_ "embed"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

var (
	//go:embed lua/lease_acquire.lua
	leaseAcquireSrc    string
	leaseAcquireScript = redis.NewScript(leaseAcquireSrc)
	//go:embed lua/lease_renew.lua
	leaseRenewSrc    string
	leaseRenewScript = redis.NewScript(leaseRenewSrc)
)

// DefaultLeaseTTL is how long a concurrency slot stays taken without a
// heartbeat: a SIGKILLed worker's slot returns within this time.
const DefaultLeaseTTL = 15 * time.Second

// Leases are a model group's concurrency slots, shared by every process.
type Leases struct {
	rdb redis.UniversalClient
	ttl time.Duration
}

// NewLeases returns the concurrency slots on rdb; ttl ≤ 0 means DefaultLeaseTTL.
func NewLeases(rdb redis.UniversalClient, ttl time.Duration) *Leases {
	if ttl <= 0 {
		ttl = DefaultLeaseTTL
	}
	return &Leases{rdb: rdb, ttl: ttl}
}

// TTL is the lease time; renew well within it (a third is a good period).
func (l *Leases) TTL() time.Duration { return l.ttl }

func leaseKey(group string) string { return "sluice:lease:" + group }

// Acquire takes a slot of group for holder if fewer than max are taken. When
// full, it says how long until the earliest lease would expire (an upper
// bound on the wait; a release usually comes sooner).
func (l *Leases) Acquire(ctx context.Context, group string, max int, holder string) (ok bool, wait time.Duration, err error) {
	res, err := leaseAcquireScript.Run(ctx, l.rdb, []string{leaseKey(group)}, max, l.ttl.Milliseconds(), holder).Int64Slice()
	if err != nil {
		return false, 0, fmt.Errorf("limiter: acquire slot of %s: %w", group, err)
	}
	return res[0] == 1, time.Duration(res[1]) * time.Millisecond, nil
}

// Renew extends holder's lease; false means it had already expired.
func (l *Leases) Renew(ctx context.Context, group, holder string) (bool, error) {
	n, err := leaseRenewScript.Run(ctx, l.rdb, []string{leaseKey(group)}, l.ttl.Milliseconds(), holder).Int64()
	if err != nil {
		return false, fmt.Errorf("limiter: renew slot of %s: %w", group, err)
	}
	return n == 1, nil
}

// Release gives holder's slot back. Releasing twice is harmless.
func (l *Leases) Release(ctx context.Context, group, holder string) error {
	if err := l.rdb.ZRem(ctx, leaseKey(group), holder).Err(); err != nil {
		return fmt.Errorf("limiter: release slot of %s: %w", group, err)
	}
	return nil
}

// Held is how many slots of group are taken now (expired ones excluded).
func (l *Leases) Held(ctx context.Context, group string) (int64, error) {
	t, err := l.rdb.Time(ctx).Result()
	if err != nil {
		return 0, err
	}
	return l.rdb.ZCount(ctx, leaseKey(group), fmt.Sprint(t.UnixMilli()+1), "+inf").Result()
}
