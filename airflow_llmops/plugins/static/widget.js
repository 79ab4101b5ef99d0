/* The LLMOps widget on Airflow's home page (a react_apps entry with destination "dashboard"). Airflow imports this
   module and renders globalThis.AirflowPlugin as a React component; it does not share its React, so the component
   returns a plain React element (an iframe of /llmops/ui/widget, the same-origin page that draws the widget). */
"use strict";
(function () {
  const ELEMENT = Symbol.for("react.transitional.element");
  function LLMOpsWidget() {
    const src = new URL("llmops/ui/widget", document.baseURI).href;
    return {
      $$typeof: ELEMENT, type: "iframe", key: null, ref: null, _owner: null, _store: {},
      props: { src, title: "LLMOps widget", style: { width: "100%", height: "280px", border: "0" } },
    };
  }
  globalThis.AirflowPlugin = LLMOpsWidget;
})();
