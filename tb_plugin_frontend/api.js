// Requests to the plugin's routes. The tab runs in an iframe whose <base href> is the plugin's
// route prefix (/data/plugin/cnnvis/, below any --path_prefix), so every URL here is relative.

/** An answer of the plugin that is not the data asked for; `message` is meant for the user. */
export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

/**
 * GETs a JSON route.
 * @param {string} route e.g. "index" or "steps"
 * @param {Object<string, string>} [params] query arguments
 * @returns {Promise<*>} the parsed JSON body
 * @throws {ApiError} when TensorBoard cannot be reached or answers with an error
 */
export async function getJson(route, params = {}) {
  const query = new URLSearchParams(params).toString();
  let response;
  try {
    response = await fetch(query ? `./${route}?${query}` : `./${route}`, {
      headers: {Accept: "application/json"},
    });
  } catch (error) {
    throw new ApiError(`TensorBoard did not answer (${error.message}). Is it still running?`, 0);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && typeof body.error === "string" ? body.error : response.statusText;
    throw new ApiError(`${response.status}: ${detail}`, response.status);
  }
  return body;
}

/** URL of the image of `run` under `tag` at `step`. */
export function imageUrl(run, tag, step) {
  return `./image?${new URLSearchParams({run, tag, step: String(step)})}`;
}
