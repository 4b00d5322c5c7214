package api

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/config"
)

// classHeader names a /v1/messages request's service class (the body is the
// Messages API's own, with no room for it).
const classHeader = "sluice-class"

// jobClass is a job's service class, the top-level "class" field:
// interactive (the default) or background.
func jobClass(top map[string]json.RawMessage) (string, error) {
	raw, ok := top["class"]
	if !ok || isNull(raw) {
		return config.ClassInteractive, nil
	}
	var c string
	if err := json.Unmarshal(raw, &c); err != nil || !validClass(c) {
		return "", invalid("class", "class must be %q (the default: dispatched first) or %q (runs when interactive work leaves room), not %s.",
			config.ClassInteractive, config.ClassBackground, truncate(string(raw), 64))
	}
	return c, nil
}

// headerClass is a /v1/messages request's service class, from the
// sluice-class header: interactive when absent.
func headerClass(c *echo.Context) (string, error) {
	v := strings.TrimSpace(c.Request().Header.Get(classHeader))
	if v == "" {
		return config.ClassInteractive, nil
	}
	if !validClass(v) {
		return "", invalid(classHeader, "The %s header must be %q (the default) or %q, not %q.",
			classHeader, config.ClassInteractive, config.ClassBackground, truncate(v, 64))
	}
	return v, nil
}

func validClass(c string) bool { return c == config.ClassInteractive || c == config.ClassBackground }

// classAllowed refuses a class the user's policy does not allow (403
// permission_error), naming the ones it does. field is where the class was
// given ("class" or the header's name).
func classAllowed(p config.UserPolicy, class, field string) error {
	if p.AllowsClass(class) {
		return nil
	}
	allowed := p.AllowedClasses()
	return &Error{Status: http.StatusForbidden, Type: "permission_error", Field: field,
		Message: fmt.Sprintf("Your requests may not use the %s class; allowed here: %s.", class, strings.Join(allowed, ", ")),
		Extra:   map[string]any{"allowed_classes": allowed}}
}

// classField is where a request named its class.
func classField(c *echo.Context) string {
	if isMessagesPath(c.Request().URL.Path) {
		return classHeader
	}
	return "class"
}
