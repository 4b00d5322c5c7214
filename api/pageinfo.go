package api

import (
	"net/http"

	"github.com/labstack/echo/v5"
)

// pageInfo is GET /v1/page-info: what the chat page shows about this
// server before it has a key. Open to anyone, so it holds only facts that
// are not secret: {"fake_upstream": true} when the answers come from the
// fake Anthropic API that sluice started itself (`sluice dev` without
// ANTHROPIC_API_KEY, the in-process load test), so the page can say the
// words are made up.
func (s *Server) pageInfo(c *echo.Context) error {
	c.Response().Header().Set("Cache-Control", "no-store")
	return c.JSON(http.StatusOK, map[string]bool{"fake_upstream": s.d.FakeUpstream})
}
