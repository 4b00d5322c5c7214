package api

import (
	"context"
	"net/http"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/config"
)

// healthz: the process is alive.
func (s *Server) healthz(c *echo.Context) error {
	return c.JSON(http.StatusOK, map[string]string{"status": "ok"})
}

// readyz: the process can serve: Redis answers within redis.timeout, and is
// not known to evict keys (the guard's last check; failing even with
// redis.allow_evicting, and saying why).
func (s *Server) readyz(c *echo.Context) error {
	timeout := s.cfg.Redis.Timeout
	if timeout <= 0 {
		timeout = config.DefaultRedisTimeout
	}
	ctx, cancel := context.WithTimeout(c.Request().Context(), timeout)
	defer cancel()
	if err := s.d.Redis.Ping(ctx).Err(); err != nil {
		return c.JSON(http.StatusServiceUnavailable, map[string]any{"status": "unavailable", "redis": "unreachable"})
	}
	if s.d.Guard != nil {
		if st := s.d.Guard.Status(); st.Evicting() {
			return c.JSON(http.StatusServiceUnavailable, map[string]string{"status": "unavailable", "redis": "evicting",
				"maxmemory_policy": st.Policy, "message": st.Problem()})
		}
	}
	return c.JSON(http.StatusOK, map[string]string{"status": "ready", "redis": "ok"})
}
