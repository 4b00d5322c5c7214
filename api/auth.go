package api

import (
	"crypto/subtle"
	"net/http"
	"strings"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/config"
)

const tenantKey = "sluice.tenant"

// presentedKey is the key a client sent, as x-api-key or Authorization:
// Bearer (the two styles the official SDKs send).
func presentedKey(r *http.Request) string {
	if k := r.Header.Get("x-api-key"); k != "" {
		return k
	}
	if a := r.Header.Get("Authorization"); len(a) > 7 && strings.EqualFold(a[:7], "bearer ") {
		return strings.TrimSpace(a[7:])
	}
	return ""
}

// tenantAuth requires a tenant API key.
func (s *Server) tenantAuth(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c *echo.Context) error {
		key := presentedKey(c.Request())
		if key == "" {
			return errNoCredentials
		}
		t, ok := s.cfg.TenantForKey(key)
		if !ok {
			return errBadCredentials
		}
		c.Set(tenantKey, t)
		return next(c)
	}
}

// optionalTenantAuth accepts a tenant key if present; a route using it also
// accepts a job token (?token=) and checks one of them itself.
func (s *Server) optionalTenantAuth(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c *echo.Context) error {
		key := presentedKey(c.Request())
		if key == "" {
			if c.QueryParam("token") == "" {
				return errNoCredentials
			}
			return next(c)
		}
		t, ok := s.cfg.TenantForKey(key)
		if !ok {
			return errBadCredentials
		}
		c.Set(tenantKey, t)
		return next(c)
	}
}

func tenantOf(c *echo.Context) *config.Tenant {
	t, _ := c.Get(tenantKey).(*config.Tenant)
	return t
}

// AdminKeyOf is the admin key a request presents: as x-api-key, Bearer, or
// the password of HTTP basic auth (so a browser can open /monitoring/).
func AdminKeyOf(r *http.Request) string {
	if key := presentedKey(r); key != "" {
		return key
	}
	_, pw, _ := r.BasicAuth()
	return pw
}

// adminAuth requires an admin key (AdminKeyOf).
func (s *Server) adminAuth(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c *echo.Context) error {
		key := AdminKeyOf(c.Request())
		if key == "" || !s.cfg.IsAdminKey(key) {
			c.Response().Header().Set("WWW-Authenticate", `Basic realm="sluice admin", charset="UTF-8"`)
			if key == "" {
				return &Error{Status: http.StatusUnauthorized, Type: "authentication_error",
					Message: "This page needs the sluice admin key: send it as x-api-key, Authorization: Bearer, or as the password when your browser asks (any user name)."}
			}
			return &Error{Status: http.StatusUnauthorized, Type: "authentication_error", Message: "This is not the sluice admin key."}
		}
		return next(c)
	}
}

// sameString compares in constant time.
func sameString(a, b string) bool { return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1 }
