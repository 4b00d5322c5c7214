package jobs

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/rkeys"
)

// FollowersKey holds a job's event-stream followers across api processes:
// a sorted set of one member per open stream, scored with the time (Redis
// clock, ms) its lease ends. The process holding a stream renews its lease;
// a process that dies stops renewing, and its streams stop counting when
// their leases end.
func FollowersKey(id string) string { return rkeys.JobFollowers(id) }

// followScript joins, renews or leaves one stream's lease and answers how
// many leases of the job are still live.
// KEYS[1] the job's followers; ARGV[1] join | renew | leave;
// ARGV[2] the stream; ARGV[3] the lease, ms.
var followScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now))
if ARGV[1] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[2])
else
  local flag = 'GT'
  if ARGV[1] == 'renew' then flag = 'XX' end
  redis.call('ZADD', KEYS[1], flag, string.format('%d', now + lease), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], string.format('%d', 2 * lease))
end
return redis.call('ZCARD', KEYS[1])
`)

// Followers counts this process's event-stream followers of jobs in Redis,
// each under a lease it renews every third of the lease.
type Followers struct {
	rdb    redis.UniversalClient
	lease  time.Duration
	prefix string // this process's part of every member

	mu   sync.Mutex
	seq  int
	open map[string]string // member → job id
	stop chan struct{}
	done chan struct{}
}

// NewFollowers starts renewing leases of length lease; Close stops.
func NewFollowers(rdb redis.UniversalClient, lease time.Duration) *Followers {
	f := &Followers{rdb: rdb, lease: lease, prefix: NewID("") + ":", open: map[string]string{},
		stop: make(chan struct{}), done: make(chan struct{})}
	go f.renew()
	return f
}

// Close stops renewing (the leases of streams still open run out).
func (f *Followers) Close() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	<-f.done
}

// Join counts one more follower of job id and returns the stream's member
// name, for Leave.
func (f *Followers) Join(ctx context.Context, id string) (string, error) {
	f.mu.Lock()
	f.seq++
	m := fmt.Sprintf("%s%d", f.prefix, f.seq)
	f.mu.Unlock()
	if err := followScript.Run(ctx, f.rdb, []string{FollowersKey(id)}, "join", m, f.lease.Milliseconds()).Err(); err != nil {
		return "", err
	}
	f.mu.Lock()
	f.open[m] = id
	f.mu.Unlock()
	return m, nil
}

// Leave ends member's lease on job id and returns how many followers the
// job has left, across the fleet.
func (f *Followers) Leave(ctx context.Context, id, member string) (int64, error) {
	f.mu.Lock()
	delete(f.open, member)
	f.mu.Unlock()
	return followScript.Run(ctx, f.rdb, []string{FollowersKey(id)}, "leave", member, f.lease.Milliseconds()).Int64()
}

func (f *Followers) renew() {
	defer close(f.done)
	t := time.NewTicker(f.lease / 3)
	defer t.Stop()
	for {
		select {
		case <-f.stop:
			return
		case <-t.C:
		}
		f.mu.Lock()
		open := make(map[string]string, len(f.open))
		for m, id := range f.open {
			open[m] = id
		}
		f.mu.Unlock()
		if len(open) == 0 {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), f.lease/3)
		_ = followScript.Load(ctx, f.rdb).Err() // Redis may have restarted since: EVALSHA needs it
		pipe := f.rdb.Pipeline()
		for m, id := range open {
			followScript.EvalSha(ctx, pipe, []string{FollowersKey(id)}, "renew", m, f.lease.Milliseconds())
		}
		_, _ = pipe.Exec(ctx) // a miss is retried at the next tick, well within the lease
		cancel()
	}
}
