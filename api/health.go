package api

import (
	"context"
	"net/http"
	"time"

	"github.com/labstack/echo/v5"
)

// healthz: the process is alive.
func (s *Server) healthz(c *echo.Context) error {
	return c.JSON(http.StatusOK, map[string]string{"status": "ok"})
}

// readyz: the process can serve (Redis answers).
func (s *Server) readyz(c *echo.Context) error {
	ctx, cancel := context.WithTimeout(c.Request().Context(), 2*time.Second)
	defer cancel()
	if err := s.d.Redis.Ping(ctx).Err(); err != nil {
		return c.JSON(http.StatusServiceUnavailable, map[string]any{"status": "unavailable", "redis": "unreachable"})
	}
	return c.JSON(http.StatusOK, map[string]string{"status": "ready", "redis": "ok"})
}
