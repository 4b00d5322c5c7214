package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/redisconn"
)

// unavailableRetry is the Retry-After, in seconds, of an answer given while
// Redis is away.
const unavailableRetry = 2

// Error is an error a client sees:
// {"error": {"type", "message", ...}} with the fields its type adds. Every
// error a handler returns becomes one of these in exactly one place
// (httpErrorHandler); anything else is a 500 whose details stay in the log.
type Error struct {
	Status     int
	Type       string
	Message    string
	Field      string         // JSON path of the offending field (invalid_request)
	Extra      map[string]any // fields the type adds (reset_at, retry_after_seconds…)
	RetryAfter int            // seconds; sets Retry-After
}

func (e *Error) Error() string { return e.Type + ": " + e.Message }

func (e *Error) body() map[string]any {
	inner := map[string]any{"type": e.Type, "message": e.Message}
	if e.Field != "" {
		inner["field"] = e.Field
	}
	for k, v := range e.Extra {
		inner[k] = v
	}
	return map[string]any{"error": inner}
}

func invalid(field, format string, args ...any) *Error {
	return &Error{Status: http.StatusBadRequest, Type: "invalid_request", Field: field, Message: fmt.Sprintf(format, args...)}
}

var (
	errNoCredentials = &Error{Status: http.StatusUnauthorized, Type: "authentication_error",
		Message: "This request has no API key. Send your sluice API key as the x-api-key header or as Authorization: Bearer <key>."}
	errBadCredentials = &Error{Status: http.StatusUnauthorized, Type: "authentication_error",
		Message: "This API key is not valid. Check that you are using a current sluice API key for your tenant."}
	errJobNotFound = &Error{Status: http.StatusNotFound, Type: "not_found",
		Message: "No job with this id exists for you. It may have expired, or the id may be mistyped."}
	errRouteNotFound = &Error{Status: http.StatusNotFound, Type: "not_found",
		Message: "There is no such endpoint. See the README for the routes sluice serves."}
	errMethodNotAllowed = &Error{Status: http.StatusMethodNotAllowed, Type: "invalid_request",
		Message: "This endpoint does not accept that HTTP method."}
	errUnavailable = &Error{Status: http.StatusServiceUnavailable, Type: "unavailable", RetryAfter: unavailableRetry,
		Extra:   map[string]any{"retry_after_seconds": unavailableRetry},
		Message: "sluice cannot reach its job store right now, so it can neither take nor look up jobs. Nothing already accepted is lost; try again in a few seconds."}
	errInternal = &Error{Status: http.StatusInternalServerError, Type: "internal_error",
		Message: "sluice hit an internal problem and could not finish this request. Nothing you sent was lost; please try again, and tell the operator if it keeps happening."}
)

// httpErrorHandler writes every error in the contract's shape.
func (s *Server) httpErrorHandler(c *echo.Context, err error) {
	if r, _ := echo.UnwrapResponse(c.Response()); r != nil && r.Committed {
		return
	}
	if errors.Is(err, context.Canceled) && c.Request().Context().Err() != nil {
		return // the client left: nobody to answer
	}
	var e *Error
	switch {
	case errors.As(err, &e):
	case errors.Is(err, jobs.ErrNotFound):
		e = errJobNotFound
	case errors.Is(err, echo.ErrNotFound):
		e = errRouteNotFound
	case errors.Is(err, echo.ErrMethodNotAllowed):
		e = errMethodNotAllowed
	case redisconn.Unavailable(err):
		s.redisAway(err)
		e = errUnavailable
	default:
		var sc echo.HTTPStatusCoder
		if errors.As(err, &sc) && sc.StatusCode() < 500 && sc.StatusCode() >= 400 {
			e = &Error{Status: sc.StatusCode(), Type: "invalid_request", Message: http.StatusText(sc.StatusCode()) + "."}
		} else {
			s.log.Error("request failed", "method", c.Request().Method, "path", c.Request().URL.Path, "err", err)
			e = errInternal
		}
	}
	if e.RetryAfter > 0 {
		c.Response().Header().Set("Retry-After", strconv.Itoa(e.RetryAfter))
	}
	if c.Request().Method == http.MethodHead {
		_ = c.NoContent(e.Status)
		return
	}
	if isMessagesPath(c.Request().URL.Path) {
		status, typ := anthropicType(e)
		// The SDKs obey x-should-retry over the status code.
		retry := "false"
		if status == http.StatusTooManyRequests || status >= 500 {
			retry = "true"
		}
		c.Response().Header().Set("x-should-retry", retry)
		_ = c.JSON(status, anthropicBody(typ, messagesError(e)))
		return
	}
	_ = c.JSON(e.Status, e.body())
}

// redisAway logs that requests are refused because Redis is away: once,
// then at most every redisAwayLogEvery while it stays away.
func (s *Server) redisAway(err error) {
	now := time.Now().UnixNano()
	last := s.awayLogged.Load()
	if now-last < int64(redisAwayLogEvery) || !s.awayLogged.CompareAndSwap(last, now) {
		return
	}
	s.log.Warn("Redis is unavailable: answering 503 until it is back", "err", err)
}

const redisAwayLogEvery = 30 * time.Second
