// Package redisconn opens sluice's Redis connections and tells a Redis
// that is away from any other error.
//
// Every call made through a client from New is bounded: connecting, sending
// and reading each get the configured timeout, and the whole call, go-redis's
// own retries included, gets it once more as a context deadline (unless the
// caller's context ends sooner). A Redis that is down, restarting, loading
// its data or hung therefore costs a request at most that long, and the
// error it leaves is one Unavailable recognises.
package redisconn

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

// QuietLogs sends go-redis's own log lines (one per failed dial while Redis
// is down) to log at debug level: sluice reports an outage itself, once.
func QuietLogs(log *slog.Logger) { redis.SetLogger(debugLog{log}) }

type debugLog struct{ log *slog.Logger }

func (d debugLog) Printf(ctx context.Context, format string, v ...any) {
	d.log.Log(ctx, slog.LevelDebug, "redis client: "+fmt.Sprintf(format, v...))
}

// The connection modes (config redis.mode).
const (
	Single   = "single"
	Sentinel = "sentinel"
	Cluster  = "cluster"
)

// New opens a client for url in mode (Single: redis://, rediss:// or
// unix://, as redis.ParseURL; Sentinel: the sentinels and master_name, as
// redis.ParseFailoverURL, a client that follows the primary through
// failovers; Cluster: seed nodes, as redis.ParseClusterURL) whose every
// call is bounded by timeout. "" is Single.
func New(mode, url string, timeout time.Duration) (redis.UniversalClient, error) {
	if timeout <= 0 {
		return nil, fmt.Errorf("redisconn: timeout must be > 0, not %s", timeout)
	}
	var c redis.UniversalClient
	switch mode {
	case Single, "":
		opt, err := redis.ParseURL(url)
		if err != nil {
			return nil, err
		}
		opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = timeout, timeout, timeout, timeout
		opt.PoolSize = poolSize(opt.PoolSize)
		c = redis.NewClient(opt)
	case Sentinel:
		opt, err := failoverOptions(url)
		if err != nil {
			return nil, err
		}
		opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = timeout, timeout, timeout, timeout
		opt.PoolSize = poolSize(opt.PoolSize)
		c = redis.NewFailoverClient(opt)
	case Cluster:
		opt, err := redis.ParseClusterURL(url)
		if err != nil {
			return nil, err
		}
		opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = timeout, timeout, timeout, timeout
		// go-redis learns a new slot map from MOVED replies, or when its
		// map is older than this interval; a primary that died answers
		// nothing, so without a short interval the client would keep
		// calling it for a minute after its replica took over.
		opt.ClusterStateReloadInterval = ClusterReload
		opt.PoolSize = poolSize(opt.PoolSize) // per node
		c = redis.NewClusterClient(opt)
	default:
		return nil, fmt.Errorf("redisconn: unknown mode %q (single, sentinel or cluster)", mode)
	}
	c.AddHook(deadline(timeout))
	return c, nil
}

// poolSize is the connection pool's size: n when the URL set pool_size,
// else at least MinPoolSize. go-redis's own default (10 per CPU) is 20 on
// a 2-core host, fewer than the api's concurrent admissions under a burst,
// which would then wait for a connection rather than for Redis.
func poolSize(n int) int {
	if n > 0 {
		return n
	}
	return max(MinPoolSize, 10*runtime.GOMAXPROCS(0))
}

// MinPoolSize is the smallest default connection pool (per Redis node).
const MinPoolSize = 64

// DefaultPoolSize is the pool size New gives a client whose URL sets none.
func DefaultPoolSize() int { return poolSize(0) }

// ClusterReload is how old a cluster client's slot map may get before it is
// read again (one CLUSTER SLOTS per interval per process while it works):
// the longest a process keeps calling a dead primary after its failover.
const ClusterReload = time.Second

// failoverOptions parses a Sentinel URL, which must name the master.
func failoverOptions(url string) (*redis.FailoverOptions, error) {
	opt, err := redis.ParseFailoverURL(url)
	if err != nil {
		return nil, err
	}
	if opt.MasterName == "" {
		return nil, errors.New("redisconn: a Sentinel URL needs ?master_name=NAME")
	}
	return opt, nil
}

// AsynqOpt is the asynq connection option for url in mode, for what builds
// its own client from one (asynqmon), with the same timeouts as New's
// clients (without New's deadline hook, which asynq cannot take).
func AsynqOpt(mode, url string, timeout time.Duration) (asynq.RedisConnOpt, error) {
	switch mode {
	case Single, "":
		opt, err := redis.ParseURL(url)
		if err != nil {
			return nil, err
		}
		return asynq.RedisClientOpt{Network: opt.Network, Addr: opt.Addr, Username: opt.Username, Password: opt.Password,
			DB: opt.DB, DialTimeout: timeout, ReadTimeout: timeout, WriteTimeout: timeout, TLSConfig: opt.TLSConfig}, nil
	case Sentinel:
		opt, err := failoverOptions(url)
		if err != nil {
			return nil, err
		}
		return asynq.RedisFailoverClientOpt{MasterName: opt.MasterName, SentinelAddrs: opt.SentinelAddrs,
			SentinelUsername: opt.SentinelUsername, SentinelPassword: opt.SentinelPassword,
			Username: opt.Username, Password: opt.Password, DB: opt.DB,
			DialTimeout: timeout, ReadTimeout: timeout, WriteTimeout: timeout, TLSConfig: opt.TLSConfig}, nil
	case Cluster:
		opt, err := redis.ParseClusterURL(url)
		if err != nil {
			return nil, err
		}
		return asynq.RedisClusterClientOpt{Addrs: opt.Addrs, MaxRedirects: opt.MaxRedirects, Username: opt.Username,
			Password: opt.Password, DialTimeout: timeout, ReadTimeout: timeout, WriteTimeout: timeout, TLSConfig: opt.TLSConfig}, nil
	}
	return nil, fmt.Errorf("redisconn: unknown mode %q (single, sentinel or cluster)", mode)
}

// deadline bounds each call (and pipeline) as a whole.
type deadline time.Duration

func (d deadline) DialHook(next redis.DialHook) redis.DialHook { return next }

func (d deadline) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		ctx, cancel := d.bound(ctx)
		defer cancel()
		return next(ctx, cmd)
	}
}

func (d deadline) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		ctx, cancel := d.bound(ctx)
		defer cancel()
		return next(ctx, cmds)
	}
}

func (d deadline) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) <= time.Duration(d) {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, time.Duration(d))
}

// Unavailable reports whether err means Redis could not be reached or could
// not serve the call now (down, restarting, loading its data, hung, out of
// memory, failing over), as opposed to a refusal of the call itself. A
// context canceled by the caller is not Redis's fault and is not reported.
func Unavailable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, redis.ErrClosed) ||
		errors.Is(err, redis.ErrPoolTimeout) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	var re redis.Error
	if errors.As(err, &re) {
		msg := strings.TrimPrefix(re.Error(), "ERR ")
		for _, p := range unavailableReplies {
			if strings.HasPrefix(msg, p) {
				return true
			}
		}
	}
	return false
}

// unavailableReplies are the error replies of a Redis that cannot serve
// now but will.
var unavailableReplies = []string{"LOADING", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "OOM"}
