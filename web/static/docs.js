// The /docs page: Swagger UI on this service's own OpenAPI document (web/routes_docs.py).
"use strict";

window.addEventListener("load", () => {
  window.ui = window.SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // Nothing leaves for another origin: no online validator badge.
    validatorUrl: null,
    // The bearer token given under "Authorize" is kept only for this tab's life.
    persistAuthorization: false,
    displayRequestDuration: true,
  });
});
