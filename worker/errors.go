package worker

import (
	"fmt"
	"net/http"

	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/upstream"
)

// jobError turns an upstream refusal into the error a job ends with: a
// sentence a person can act on, with the upstream's own words kept.
func jobError(ue *upstream.Error) *jobs.Error {
	said := ""
	if ue.Message != "" {
		said = " The API said: " + quote(ue.Message)
	}
	switch {
	case ue.Kind == upstream.KindSpendLimit:
		return &jobs.Error{Type: "spend_limit", Message: "The Anthropic account behind this service has reached its spend limit, so no request can run until an operator raises the limit or the billing period turns." + said}
	case ue.Status == http.StatusBadRequest || ue.Status == http.StatusOK:
		return &jobs.Error{Type: "invalid_request", Message: "The Anthropic API refused this request as invalid." + said}
	case ue.Status == http.StatusUnauthorized || ue.Status == http.StatusForbidden:
		return &jobs.Error{Type: "upstream_auth", Message: fmt.Sprintf("The Anthropic API refused this service's credentials (%d %s); an operator must check ANTHROPIC_API_KEY and its permissions.%s", ue.Status, ue.Type, said)}
	case ue.Status == http.StatusPaymentRequired:
		return &jobs.Error{Type: "upstream_billing", Message: "The Anthropic API refused this request for a billing reason; an operator must check the account." + said}
	case ue.Status == http.StatusNotFound:
		return &jobs.Error{Type: "not_found", Message: "The Anthropic API does not know the model or route this request asked for." + said}
	case ue.Status == http.StatusRequestEntityTooLarge:
		return &jobs.Error{Type: "request_too_large", Message: "The request is larger than the Anthropic API accepts; shorten the conversation." + said}
	}
	return &jobs.Error{Type: "upstream_error", Message: fmt.Sprintf("The Anthropic API refused this request (%s).", describe(ue))}
}

func describe(ue *upstream.Error) string {
	s := ""
	if ue.Status != 0 {
		s = fmt.Sprintf("%d ", ue.Status)
	}
	if ue.Type != "" {
		s += ue.Type
	} else {
		s += ue.Reason()
	}
	if ue.Message != "" {
		s += ": " + ue.Message
	}
	return s
}

func quote(s string) string {
	if len(s) > 500 {
		s = s[:500] + "…"
	}
	return "“" + s + "”"
}
