package api

import (
	"net/http"
	"net/http/pprof"
	"strings"

	"github.com/labstack/echo/v5"
)

// routes is the whole HTTP surface, one line a route.
func (s *Server) routes() {
	e := s.echo
	e.GET("/healthz", s.healthz)
	e.GET("/readyz", s.readyz)
	e.GET("/v1/page-info", s.pageInfo) // open: non-secret facts for the chat page

	e.POST("/v1/jobs", s.createJob, s.tenantAuth)
	e.GET("/v1/jobs", s.listJobs, s.tenantAuth)
	e.GET("/v1/jobs/:id", s.getJob, s.optionalTenantAuth)
	e.DELETE("/v1/jobs/:id", s.cancelJob, s.tenantAuth)
	e.GET("/v1/jobs/:id/events", s.jobEvents, s.optionalTenantAuth)
	e.GET("/v1/users/:user_id/usage", s.userUsage, s.tenantAuth)
	e.POST("/v1/messages", s.createMessage, s.tenantAuth)
	e.POST("/v1/messages/count_tokens", s.countTokens, s.tenantAuth)

	e.GET("/v1/admin/usage", s.adminUsage, s.adminAuth)
	e.GET("/v1/admin/status", s.adminStatus, s.adminAuth)
	e.GET("/dashboard", s.dashboard, s.adminAuth)
	e.GET("/dashboard/*", s.dashboard, s.adminAuth)
	if s.d.Metrics != nil {
		// Prometheus: open to scrapers unless configured otherwise (no
		// metric names a user).
		m := echo.WrapHandler(s.d.Metrics.Handler())
		if s.cfg.Metrics.RequireAdminKey {
			e.GET("/metrics", m, s.adminAuth)
		} else {
			e.GET("/metrics", m)
		}
	}
	if s.d.Monitoring != nil {
		mon := echo.WrapHandler(s.d.Monitoring)
		e.GET("/monitoring", func(c *echo.Context) error { return c.Redirect(http.StatusMovedPermanently, "/monitoring/") }, s.adminAuth)
		e.Any("/monitoring/*", mon, s.adminAuth)
	}
	// Go's profiler, for operators (admin key): /debug/pprof/.
	e.Any("/debug/pprof/*", echo.WrapHandler(http.HandlerFunc(profile)), s.adminAuth)

	if s.d.Web != nil {
		// The pages own every other GET, but not the API's namespace: an
		// unknown /v1 path is a JSON not_found like any API error.
		page := echo.WrapHandler(s.d.Web)
		e.GET("/*", func(c *echo.Context) error {
			if p := c.Request().URL.Path; p == "/v1" || strings.HasPrefix(p, "/v1/") {
				return errRouteNotFound
			}
			return page(c)
		})
	}
	e.RouteNotFound("/*", func(c *echo.Context) error { return errRouteNotFound })
}

// profile serves net/http/pprof's pages under /debug/pprof/.
func profile(w http.ResponseWriter, r *http.Request) {
	switch name := strings.TrimPrefix(r.URL.Path, "/debug/pprof/"); name {
	case "cmdline":
		pprof.Cmdline(w, r)
	case "profile":
		pprof.Profile(w, r)
	case "symbol":
		pprof.Symbol(w, r)
	case "trace":
		pprof.Trace(w, r)
	default:
		pprof.Index(w, r) // the index, and heap, goroutine, allocs… by name
	}
}
