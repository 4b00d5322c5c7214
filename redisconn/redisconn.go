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
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// QuietLogs sends go-redis's own log lines (one per failed dial while Redis
// is down) to log at debug level: sluice reports an outage itself, once.
func QuietLogs(log *slog.Logger) { redis.SetLogger(debugLog{log}) }

type debugLog struct{ log *slog.Logger }

func (d debugLog) Printf(ctx context.Context, format string, v ...any) {
	d.log.Log(ctx, slog.LevelDebug, "redis client: "+fmt.Sprintf(format, v...))
}

// New opens a client for url (redis://, rediss:// or unix://) whose every
// call is bounded by timeout.
func New(url string, timeout time.Duration) (*redis.Client, error) {
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, err
	}
	if timeout <= 0 {
		return nil, fmt.Errorf("redisconn: timeout must be > 0, not %s", timeout)
	}
	opt.DialTimeout = timeout
	opt.ReadTimeout = timeout
	opt.WriteTimeout = timeout
	opt.PoolTimeout = timeout
	c := redis.NewClient(opt)
	c.AddHook(deadline(timeout))
	return c, nil
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
