// Package api is sluice's HTTP server (Echo v5): authentication, validation,
// admission, the job routes and their Server-Sent Events, health checks, and
// the embedded asynqmon and web pages. routes.go lists the whole surface.
package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v5"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/estimate"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/metrics"
	"github.com/sluice-dev/sluice/redisguard"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/upstream"
	"github.com/sluice-dev/sluice/usage"
)

// Deps are what the api needs.
type Deps struct {
	// FakeUpstream: the upstream is sluice's own fake Anthropic API (dev,
	// the in-process load test, tests): GET /v1/page-info says so, and the
	// chat page tells its reader the answers are made up.
	FakeUpstream bool
	Config       *config.Config
	Redis        redis.UniversalClient
	Store        *jobs.Store
	Hub          *jobs.Hub
	Scheduler    *scheduler.Scheduler
	Estimator    *estimate.Calibrator
	Upstream     *upstream.Client // for count_tokens (groups with count_tokens: true); nil = estimate only
	// TokenSecret signs job read tokens (jobs.TokenSecret: shared by the fleet).
	TokenSecret []byte
	Monitoring  http.Handler     // asynqmon, mounted at /monitoring/ behind admin auth; nil = not mounted
	Web         http.Handler     // the embedded pages at /; nil = none
	Dashboard   http.Handler     // the ops dashboard at /dashboard, behind admin auth; nil = none
	Metrics     *metrics.Metrics // nil = no /metrics
	Usage       *usage.Recorder  // nil = no usage statistics
	// Guard is the Redis eviction guard: /readyz fails while it finds an
	// evicting Redis, and /v1/admin/status reports it. nil = no guard.
	Guard *redisguard.Guard
	// PositionEvery is how often followed jobs' places are read even when no
	// queue announced a move; 0 = one second (tests set it long, to see the
	// announcements work alone).
	PositionEvery time.Duration
	// PingEvery is how often a streamed /v1/messages request gets a `ping`
	// event; 0 = every 5 s (tests set it short).
	PingEvery time.Duration
	Logger    *slog.Logger
	Clock     func() time.Time // nil = time.Now
}

// Server is the api.
type Server struct {
	cfg   *config.Config
	d     Deps
	log   *slog.Logger
	now   func() time.Time
	echo  *echo.Echo
	stop  context.Context // ends when the server shuts down: SSE streams close
	close context.CancelFunc

	// SSE heartbeat period: a comment line keeps idle streams alive through
	// proxies that cut silent connections.
	heartbeat time.Duration
	watching  watchers
	followers *jobs.Followers
	// awayLogged is when "Redis is unavailable" was last logged (unix ns).
	awayLogged atomic.Int64
}

// DefaultHeartbeat is the SSE heartbeat period.
const DefaultHeartbeat = 15 * time.Second

// New builds the api server.
func New(d Deps) *Server {
	if d.Clock == nil {
		d.Clock = time.Now
	}
	s := &Server{cfg: d.Config, d: d, log: d.Logger, now: d.Clock, heartbeat: DefaultHeartbeat}
	s.stop, s.close = context.WithCancel(context.Background())
	lease := d.Config.API.FollowerLease
	if lease <= 0 {
		lease = config.DefaultFollowerLease
	}
	s.followers = jobs.NewFollowers(d.Redis, lease)
	s.watching.jobs = map[string]*watched{}
	s.watching.kicked = map[string]bool{}
	s.watching.kick = make(chan struct{}, 1)
	if d.Scheduler != nil {
		s.listenMoved()
		go s.pushPositions()
	}
	e := echo.New()
	e.Logger = d.Logger
	e.HTTPErrorHandler = s.httpErrorHandler
	s.echo = e
	s.routes()
	return s
}

// ServeHTTP serves the api.
// A request with a body must deliver it within api.body_timeout (readBodyFor
// lifts the deadline once it has the body); the response, an event stream
// included, may then take as long as it needs.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength != 0 && s.cfg.API.BodyTimeout > 0 {
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(s.cfg.API.BodyTimeout))
	}
	s.echo.ServeHTTP(w, r)
}

// CloseStreams ends every open event stream; call it when shutdown begins,
// since http.Server.Shutdown waits for handlers but does not cancel them.
func (s *Server) CloseStreams() {
	s.close()
	s.followers.Close()
}

// readBodyFor reads the request body up to the tenant's limit (or the
// server's, whichever is smaller); larger is a 413.
func (s *Server) readBodyFor(c *echo.Context, t *config.Tenant) ([]byte, error) {
	limit := s.cfg.API.BodyLimitBytes
	if t != nil && t.MaxBodyBytes > 0 && t.MaxBodyBytes < limit {
		limit = t.MaxBodyBytes
	}
	r := c.Request()
	if r.ContentLength > limit {
		return nil, tooLarge(r.ContentLength, limit)
	}
	b, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		c.Response().Header().Set("Connection", "close")
		return nil, &Error{Status: http.StatusRequestTimeout, Type: "request_timeout",
			Message: fmt.Sprintf("The request body did not arrive within %s of its headers, so the connection was closed. Send the whole body at once and try again.", s.cfg.API.BodyTimeout)}
	}
	if err != nil {
		return nil, invalid("", "The request body could not be read: the connection broke while sending it.")
	}
	_ = http.NewResponseController(c.Response()).SetReadDeadline(time.Time{})
	if int64(len(b)) > limit {
		return nil, tooLarge(-1, limit)
	}
	return b, nil
}

func tooLarge(size, limit int64) *Error {
	msg := fmt.Sprintf("The request body is larger than the %s this server accepts. Shorten the conversation or send less at once.", byteSize(limit))
	if size > 0 {
		msg = fmt.Sprintf("The request body is %s; this server accepts at most %s. Shorten the conversation or send less at once.", byteSize(size), byteSize(limit))
	}
	return &Error{Status: http.StatusRequestEntityTooLarge, Type: "request_too_large", Message: msg}
}

func byteSize(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d bytes", n)
}
