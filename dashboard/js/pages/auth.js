// Sign in, and "Create one" (register, then back to sign in).
import { session, setFlash, setRegisteredEmail, takeFlash, takeRegisteredEmail } from '../api.js';
import { h } from '../dom.js';
import { logo } from '../icons.js';
import { alertBox, field, setBusy, showFieldErrors } from '../components.js';
import { renderDag } from '../dag.js';
import { characterCount } from '../format.js';

const DEMO_STAGES = [
  { id: 'extract', name: 'Extract key points', agentCapability: 'text-generation', dependencies: [] },
  { id: 'translate', name: 'Translate', agentCapability: 'translation', dependencies: ['extract'] },
  { id: 'classify', name: 'Classify', agentCapability: 'classification', dependencies: ['extract'] },
  { id: 'summarize', name: 'Summarize', agentCapability: 'summarization', dependencies: ['translate', 'classify'] },
];
const DEMO_STEPS = [
  { extract: 'queued' },
  { extract: 'in_progress' },
  { extract: 'completed', translate: 'in_progress', classify: 'in_progress' },
  { extract: 'completed', translate: 'completed', classify: 'in_progress' },
  { extract: 'completed', translate: 'completed', classify: 'completed', summarize: 'in_progress' },
  { extract: 'completed', translate: 'completed', classify: 'completed', summarize: 'completed' },
  { extract: 'completed', translate: 'completed', classify: 'completed', summarize: 'completed' },
];

function hero(ctx) {
  const demo = (step) =>
    DEMO_STAGES.map((stage) => ({
      ...stage,
      status: DEMO_STEPS[step][stage.id] || 'pending',
      agentId: DEMO_STEPS[step][stage.id] ? `${stage.agentCapability.split('-')[0]}-agent` : null,
      durationMs: 180 + stage.id.length * 37,
    }));
  const graph = renderDag(demo(0), { orientation: 'lr', label: 'An example pipeline running' });
  let step = 0;
  const reduced = window.matchMedia('(prefers-reduced-motion: reduce)').matches;
  if (!reduced) {
    const timer = setInterval(() => {
      step = (step + 1) % DEMO_STEPS.length;
      graph.update(demo(step));
    }, 1100);
    ctx.onCleanup(() => clearInterval(timer));
  }
  return h(
    'aside',
    { class: 'auth__hero', 'aria-hidden': 'true' },
    h('div', { class: 'auth__hero-brand' }, logo(36), h('span', null, 'MAOF')),
    h('h2', { class: 'auth__hero-title' }, 'Watch your agent pipelines light up.'),
    h('p', { class: 'auth__hero-text' }, 'Chain AI agents into workflows, see every stage run live, and keep a tamper-evident audit trail of who did what.'),
    h('div', { class: 'auth__hero-graph' }, graph.element),
  );
}

function authLayout(ctx, content) {
  return h('div', { class: 'auth' }, hero(ctx), h('div', { class: 'auth__panel' }, h('div', { class: 'auth__card' }, content)));
}

/** Sign-in and register share one page: brand, title, subtitle, the form, a switch link. */
function showAuthPage(ctx, { title, subtitle, notice = null, form, switchText, switchHref, switchLabel }) {
  ctx.root.append(
    authLayout(
      ctx,
      h(
        'div',
        null,
        h('div', { class: 'auth__mobile-brand' }, logo(32), h('strong', null, 'MAOF')),
        h('h1', { class: 'auth__title' }, title),
        h('p', { class: 'auth__subtitle' }, subtitle),
        notice,
        form,
        h('p', { class: 'auth__switch' }, switchText, h('a', { href: switchHref }, switchLabel)),
      ),
    ),
  );
  form.querySelector('[autofocus]')?.focus();
}

export async function loginPage(ctx) {
  const flash = takeFlash();
  const email = takeRegisteredEmail();
  const error = h('div', { class: 'form-error' });
  const submit = h('button', { class: 'btn btn--primary btn--block btn--large', type: 'submit' }, 'Sign in');
  const form = h(
    'form',
    { class: 'form', novalidate: true, 'aria-label': 'Sign in' },
    field({ label: 'Email', name: 'email', type: 'email', attrs: { autocomplete: 'email', required: true, value: email, autofocus: !email } }),
    field({ label: 'Password', name: 'password', type: 'password', attrs: { autocomplete: 'current-password', required: true, autofocus: Boolean(email) } }),
    error,
    submit,
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.replaceChildren();
    const data = Object.fromEntries(new FormData(form));
    const missing = ['email', 'password'].filter((name) => !String(data[name] || '').trim()).map((name) => ({ field: name, message: 'is required' }));
    if (missing.length) {
      showFieldErrors(form, missing);
      return;
    }
    showFieldErrors(form, []);
    setBusy(submit, true, 'Signing in…');
    try {
      const result = await ctx.api.post('/auth/login', { email: data.email.trim(), password: data.password }, { auth: false });
      await session.start(result);
      const returnTo = sessionStorage.getItem('maof.returnTo');
      sessionStorage.removeItem('maof.returnTo');
      ctx.navigate(returnTo && !returnTo.startsWith('#/login') ? returnTo : '#/');
    } catch (err) {
      setBusy(submit, false);
      const rest = showFieldErrors(form, err.details || []);
      error.replaceChildren(alertBox('error', err.status === 401 ? 'Wrong email or password.' : err.message, { details: rest }));
    }
  });
  showAuthPage(ctx, {
    title: 'Sign in',
    subtitle: 'Welcome back. Sign in to watch your workflows run.',
    notice: flash ? h('div', { class: 'flash', 'data-testid': 'flash' }, alertBox(flash.kind, flash.message)) : null,
    form,
    switchText: 'No account yet? ',
    switchHref: '#/register',
    switchLabel: 'Create one',
  });
}

export async function registerPage(ctx) {
  const error = h('div', { class: 'form-error' });
  const submit = h('button', { class: 'btn btn--primary btn--block btn--large', type: 'submit' }, 'Create account');
  const form = h(
    'form',
    { class: 'form', novalidate: true, 'aria-label': 'Create an account' },
    field({ label: 'Name', name: 'name', attrs: { autocomplete: 'name', required: true, autofocus: true } }),
    field({ label: 'Email', name: 'email', type: 'email', attrs: { autocomplete: 'email', required: true } }),
    field({
      label: 'Password',
      name: 'password',
      type: 'password',
      hint: '8 to 128 characters.',
      attrs: { autocomplete: 'new-password', required: true, minlength: 8 },
    }),
    error,
    submit,
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.replaceChildren();
    const data = Object.fromEntries(new FormData(form));
    const problems = [];
    // Lengths in characters as the API counts them (a maxlength would count UTF-16 units).
    if (!String(data.name || '').trim()) problems.push({ field: 'name', message: 'is required' });
    else if (characterCount(data.name.trim()) > 255) problems.push({ field: 'name', message: 'must be at most 255 characters' });
    if (!/^\S+@\S+\.\S+$/.test(String(data.email || '').trim())) problems.push({ field: 'email', message: 'must be an email address' });
    const password = characterCount(String(data.password || ''));
    if (password < 8 || password > 128) problems.push({ field: 'password', message: 'must be 8 to 128 characters' });
    if (problems.length) {
      showFieldErrors(form, problems);
      return;
    }
    showFieldErrors(form, []);
    setBusy(submit, true, 'Creating your account…');
    try {
      const user = await ctx.api.post(
        '/auth/register',
        { name: data.name.trim(), email: data.email.trim(), password: data.password },
        { auth: false },
      );
      setRegisteredEmail(user.email);
      setFlash(`Account created for ${user.email}. Sign in to continue.`, 'success');
      ctx.navigate('#/login');
    } catch (err) {
      setBusy(submit, false);
      const details = err.code === 'CONFLICT' ? [{ field: 'email', message: 'is already registered' }] : err.details || [];
      const rest = showFieldErrors(form, details);
      if (err.code !== 'CONFLICT') error.replaceChildren(alertBox('error', err.message, { details: rest }));
    }
  });
  showAuthPage(ctx, {
    title: 'Create an account',
    subtitle: 'Register, then sign in with your new password.',
    form,
    switchText: 'Already have an account? ',
    switchHref: '#/login',
    switchLabel: 'Sign in',
  });
}
